"""The local stack's MLflow app (orchestrator.stack_mlflow), in-process: its page's defaults
script, the entry point `mlflow server --app-name` finds, and the MLflow page it wraps.
tests/test_dashboard.py checks what a browser then shows."""

from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import Path

import pytest

from orchestrator.stack_mlflow import APP_NAME, UI_DEFAULTS, app_plugin, with_defaults


def test_the_defaults_script_comes_first_in_head_and_sets_only_missing_choices() -> None:
    page = with_defaults('<html><head><script src="main.js"></script></head></html>')
    assert page.index("localStorage") < page.index("main.js"), "before MLflow's own script"
    values = json.loads(re.search(r"var d=(\{.*?\}),s=", page)[1])  # type: ignore[index]
    assert {k: json.loads(v) for k, v in values.items()} == UI_DEFAULTS
    assert values["mlflow.workflowType_v1"] == '"machine_learning"'  # MLflow's JSON, versioned
    assert "s.getItem(k)===null" in page, "a choice the browser holds is kept"
    with pytest.raises(ValueError, match="no <head>"):
        with_defaults("<html></html>")


def test_the_app_plugin_is_an_mlflow_app_entry_point(tmp_path: Path) -> None:
    app_plugin(tmp_path)
    app_plugin(tmp_path)  # written again at each `up`: harmless
    [dist] = list(metadata.distributions(path=[str(tmp_path)]))
    [entry] = [e for e in dist.entry_points if e.group == "mlflow.app"]
    assert (entry.name, entry.value) == (APP_NAME, "orchestrator.stack_mlflow:create_app")


def test_the_mlflow_page_it_wraps_has_a_head() -> None:
    """MLflow's built page, found without importing its server (a minute on a busy machine):
    an MLflow upgrade that drops its <head> fails here, not in the browser."""
    import importlib.util

    spec = importlib.util.find_spec("mlflow")
    assert spec is not None and spec.origin is not None
    index = Path(spec.origin).parent / "server" / "js" / "build" / "index.html"
    assert "<head>" in index.read_text()
