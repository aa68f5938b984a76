"""Where MLflow is: the one place a command reads MLFLOW_TRACKING_URI.

Unset, MLflow's client falls back to a database file in the working folder (./mlflow.db, or
./mlruns), which a command would create by accident and then search in vain ("not found in
MLflow"). Every command that talks to MLflow asks here first and is refused, exit 2, with the
variable named, instead. Imports neither MLflow nor anything heavy until a client is asked for.
"""

from __future__ import annotations

import os
from typing import Any

from orchestrator.errors import UsageError

VARIABLE = "MLFLOW_TRACKING_URI"
HOW = (
    f"set {VARIABLE} to the tracking server (the local stack: "
    'eval "$(python -m orchestrator.stack env)")'
)


class TrackingURIUnset(UsageError, RuntimeError):
    """A command needs the MLflow tracking server and MLFLOW_TRACKING_URI is not set."""


def tracking_uri(what: str, otherwise: str = "") -> str:
    """MLFLOW_TRACKING_URI, or raise TrackingURIUnset saying that `what` needs it, how to set
    it, and `otherwise` (another way on, e.g. "or tracking.enabled=false") where there is one."""
    uri = os.environ.get(VARIABLE, "").strip()
    if not uri:
        more = f", {otherwise}" if otherwise else ""
        raise TrackingURIUnset(f"{what} needs {VARIABLE}, which is not set: {HOW}{more}")
    return uri


def shown_uri(uri: str) -> str:
    """`uri` without a user or password in it, to print."""
    scheme, sep, rest = uri.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else uri


def tracking_client(what: str) -> Any:
    """An MLflow client of the server in MLFLOW_TRACKING_URI (TrackingURIUnset where unset)."""
    uri = tracking_uri(what)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)
