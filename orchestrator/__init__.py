"""Train the ResNet family of He et al. (2016) at cluster scale.

The engine behind `jobs/*.py`: typed specs (spec), launch on Ray Train (launch), the worker
loop (train), models, data, evaluation, tracking, checkpoints and the local stack (stack).
"""

__version__ = "0.1.0"
