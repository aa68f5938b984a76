"""The local stack's MLflow app: MLflow's basic-auth app, whose UI opens on model training.

MLflow 3's UI keeps three choices in the browser (localStorage), with defaults aimed at GenAI
work: the sidebar's workflow switch (GenAI or Model training; GenAI by default, whatever the
experiment's `mlflow.experimentKind`), the "MLflow Assistant" panel (opened by itself on the
first visit to a server on localhost / 127.0.0.1) and Settings' "Enable telemetry" (On by
default, even where the server has telemetry off and drops what the UI would send). This app
serves MLflow's page with a few lines of script in front of MLflow's own, which set those
choices to Model training, panel not opened, telemetry off, where the browser has made no
choice yet: what a user picks afterwards in the UI stays theirs.

`mlflow server --app-name` finds apps only among the `mlflow.app` entry points of an installed
distribution; `app_plugin` writes one that names this module's `create_app`
(orchestrator.stack puts it on the server's PYTHONPATH, so nothing has to be reinstalled).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

APP_NAME = "resnet-stack"  # `mlflow server --app-name` of the local stack

# localStorage key -> value, as MLflow 3.17's UI stores them (`<key>_v<version>`, JSON)
UI_DEFAULTS: dict[str, object] = {
    "mlflow.workflowType_v1": "machine_learning",
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,
    "mlflow.settings.telemetry.enabled_v1": False,
}


def defaults_script(defaults: dict[str, object] = UI_DEFAULTS) -> str:
    """The <script> that sets each of `defaults` the browser does not hold yet."""
    values = json.dumps({k: json.dumps(v) for k, v in defaults.items()}, sort_keys=True)
    return (
        "<script>(function(){try{var d=" + values + ",s=window.localStorage;"
        "for(var k in d){if(s.getItem(k)===null){s.setItem(k,d[k]);}}}catch(e){}})();</script>"
    )


def with_defaults(index_html: str, script: str | None = None) -> str:
    """MLflow's index.html with the defaults' script first in <head>, before MLflow's own."""
    head = "<head>"
    if head not in index_html:
        raise ValueError("MLflow's index.html has no <head>: its UI defaults cannot be set")
    return index_html.replace(head, head + (script or defaults_script()), 1)


def create_app() -> Any:
    """The app factory `mlflow server --app-name resnet-stack` runs in each server worker:
    MLflow's basic-auth app, its page served with the UI defaults."""
    from flask import Response
    from mlflow.server import app as flask_app
    from mlflow.server.auth import create_app as basic_auth_app

    index = Path(str(flask_app.static_folder)) / "index.html"
    page = with_defaults(index.read_text(encoding="utf-8"))

    def serve() -> Response:
        # no caching: an old copy would miss a changed script
        return Response(page, mimetype="text/html", headers={"Cache-Control": "no-cache"})

    if "serve" not in flask_app.view_functions:
        raise RuntimeError("MLflow's app has no `serve` page: its UI defaults cannot be set")
    flask_app.view_functions["serve"] = serve  # the page of "/" (MLflow's index.html)
    return basic_auth_app(flask_app)


def app_plugin(folder: Path) -> Path:
    """A distribution under `folder` whose `mlflow.app` entry point `APP_NAME` is `create_app`;
    returns `folder`, for PYTHONPATH."""
    dist = folder / "resnet_orchestrator_stack_app-1.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: resnet-orchestrator-stack-app\nVersion: 1\n"
    )
    (dist / "entry_points.txt").write_text(f"[mlflow.app]\n{APP_NAME} = {__name__}:create_app\n")
    return folder


def bootstrap_auth(env: dict[str, str], auth_db: Path) -> str | None:
    """Create the basic-auth store and its admin once, before the server's workers start.
    `mlflow server` does this itself only for its own `basic-auth` app; with ours each worker
    does it, and on a fresh store two workers creating the tables at once is a race one loses:
    it dies, and the server runs on one worker while its parent waits a minute on the dead one
    (ignoring SIGTERM meanwhile). `env`: the server's (MLFLOW_AUTH_CONFIG_PATH). Returns why
    it failed (the server's own start would fail on it too), else None."""
    if auth_db.exists():
        return None
    code = "from mlflow.server.auth import bootstrap_admin_user; bootstrap_admin_user()"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    return done.stderr[-2000:] if done.returncode != 0 else None
