"""One word for a run's newest committed checkpoint: `last`, in every command line and in the
registry (MLflow reserves the alias `latest`). `latest` is refused with exit 2, naming `last`,
before any service is reached."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest

from orchestrator.checkpoint_refs import WHICH, CheckpointRefError, check_which
from orchestrator.ensemble_eval.config import EnsembleConfig, parse_args
from orchestrator.paper.layer_responses import build_parser as layer_responses_parser
from orchestrator.publish.__main__ import build_parser as publish_parser


def test_last_is_the_word_and_latest_is_refused_naming_it() -> None:
    assert WHICH == ("best", "last")
    assert [check_which(w) for w in WHICH] == ["best", "last"]
    with pytest.raises(CheckpointRefError, match="checkpoint 'latest': say 'last'"):
        check_which("latest")
    with pytest.raises(CheckpointRefError, match="expected one of best, last"):
        check_which("newest")


@pytest.mark.parametrize(
    "parse",
    [
        lambda argv: publish_parser().parse_args(["--run", "R", *argv]),
        lambda argv: layer_responses_parser().parse_args(["--run", "R", *argv]),
    ],
    ids=["publish", "layer_responses"],
)
def test_the_command_lines_refuse_latest_with_exit_2(
    parse: Callable[[list[str]], argparse.Namespace], capsys: pytest.CaptureFixture[str]
) -> None:
    assert parse(["--checkpoint", "last"]).checkpoint == "last"
    with pytest.raises(SystemExit) as stop:
        parse(["--checkpoint", "latest"])
    assert stop.value.code == 2
    assert "argument --checkpoint: checkpoint 'latest': say 'last'" in capsys.readouterr().err


def test_an_ensemble_refuses_latest_naming_last() -> None:
    base = EnsembleConfig(runs=["A"])
    assert parse_args(["--checkpoint", "last"], base).checkpoint == "last"
    with pytest.raises(ValueError, match="--checkpoint 'latest': say 'last'") as refused:
        parse_args(["--checkpoint", "latest"], base)
    assert getattr(refused.value, "exit_code", None) == 2
