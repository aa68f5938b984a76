"""MLflow: one run per job (the tracker only logs and closes), the tag names, lineage, liveness,
the report of a finished run, and the few MLflow internals the project touches.

Import the submodule you need; this package's face imports nothing (the spec side stays light).
"""
