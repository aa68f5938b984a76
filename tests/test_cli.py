"""The one command-line wrapper (orchestrator.cli) and the error base (orchestrator.errors): exit
codes, the one `error:` line, logging set up once, and every entry point answering the same."""

from __future__ import annotations

import ast
import builtins
import logging
import os
import pickle
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

from orchestrator.cli import EXIT_INTERRUPTED, LOG_FORMAT, is_the_program, run_cli, setup_logging
from orchestrator.errors import OrchestratorError, UsageError
from tests.conftest import ROOT, run_main

# ------------------------------------------------------------------------------ run_cli


def test_the_entry_points_code_and_argv_come_through() -> None:
    seen: list[list[str]] = []

    def main(argv: list[str]) -> int:
        seen.append(argv)
        return 3

    assert run_cli(main, ("a", "--b")) == 3
    assert seen == [["a", "--b"]]
    assert run_cli(lambda argv: None, []) == 0  # None is success


def test_argv_defaults_to_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["prog", "x", "y"])
    assert run_cli(lambda argv: len(argv)) == 2


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (UsageError("--nodes 0: expected >= 1"), 2),
        (OrchestratorError("job smoke failed at step 3"), 1),
    ],
)
def test_an_orchestrator_error_is_one_line_and_its_exit_code(
    error: OrchestratorError, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    def main(argv: list[str]) -> None:
        print("before")
        raise error

    assert run_cli(main, []) == code
    out, err = capsys.readouterr()
    assert out == "before\n"
    assert err == f"error: {error}\n"


def test_a_subclass_sets_its_own_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    class Busy(OrchestratorError):
        exit_code = 75

    def main(argv: list[str]) -> None:
        raise Busy("the store is busy: try again")

    assert run_cli(main, []) == 75
    assert capsys.readouterr().err == "error: the store is busy: try again\n"


def test_a_multi_line_message_keeps_its_lines_under_one_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def main(argv: list[str]) -> None:
        raise UsageError("pre-flight refused job smoke:\n  - model: bad\n  - data: missing")

    assert run_cli(main, []) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "error: pre-flight refused job smoke:",
        "  - model: bad",
        "  - data: missing",
    ]


def test_the_message_is_scrubbed_of_credentials(capsys: pytest.CaptureFixture[str]) -> None:
    def main(argv: list[str]) -> None:
        raise UsageError("cannot read s3://AKIAABCDEFGHIJKLMNOP:hunter2secret@bucket/x")

    assert run_cli(main, []) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read s3://") and "hunter2secret" not in err, err


def test_ctrl_c_exits_130(capsys: pytest.CaptureFixture[str]) -> None:
    def main(argv: list[str]) -> None:
        raise KeyboardInterrupt

    assert run_cli(main, []) == EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_any_other_error_propagates_with_its_traceback() -> None:
    def main(argv: list[str]) -> None:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(main, [])


# ------------------------------------------------------------------------------ logging


def bare_root_logger(monkeypatch: pytest.MonkeyPatch) -> logging.Logger:
    """The root logger as a fresh process has it: pytest's handlers (added for each test phase,
    so set aside here, in the test's body) and level restored after the test."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    return root


def test_logging_is_set_up_once_at_orch_log_level(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = bare_root_logger(monkeypatch)
    monkeypatch.setenv("ORCH_LOG_LEVEL", "debug")
    assert run_cli(lambda argv: None, []) == 0
    assert run_cli(lambda argv: None, []) == 0
    setup_logging()
    assert len(root.handlers) == 1
    handler = root.handlers[0]
    assert handler.formatter is not None and handler.formatter._fmt == LOG_FORMAT
    assert root.level == logging.DEBUG


def test_the_default_level_applies_without_orch_log_level(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = bare_root_logger(monkeypatch)
    monkeypatch.delenv("ORCH_LOG_LEVEL", raising=False)
    assert run_cli(lambda argv: None, [], log_level="WARNING") == 0
    assert root.level == logging.WARNING


def test_a_bad_orch_log_level_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = bare_root_logger(monkeypatch)
    monkeypatch.setenv("ORCH_LOG_LEVEL", "LOUD")
    ran: list[bool] = []
    assert run_cli(lambda argv: ran.append(True), []) == 2
    assert not ran and not root.handlers
    err = capsys.readouterr().err
    assert err.startswith("error: ORCH_LOG_LEVEL='LOUD' is not a log level") and "INFO" in err


# ------------------------------------------------------------------------------ the error classes


# the exception classes kept off the base, each for a reason its own comment gives
OFF_THE_BASE = {"Terminated", "_Permanent", "_Refused"}


def _classes() -> dict[str, tuple[type[BaseException], int, type[BaseException]]]:
    """Name: (class, exit code, the builtin base its callers catch)."""
    from orchestrator.checkpoint import UnsafeCheckpointError
    from orchestrator.checkpoint_refs import CheckpointRefError
    from orchestrator.data.ledger import LedgerError
    from orchestrator.data.manifest import BadShard, DataError, DataUnavailable
    from orchestrator.ensemble_eval.config import EnsembleError
    from orchestrator.evaluation import UnknownProtocolError
    from orchestrator.job_lease import LeaseHeld
    from orchestrator.launch import JobFailed
    from orchestrator.models.registry import UnknownModelError
    from orchestrator.paper.layer_responses import LayerResponsesError
    from orchestrator.plan.job import PlanError
    from orchestrator.preflight import PreflightError
    from orchestrator.publish.classifier import WeightsChangedError
    from orchestrator.publish.register import PublishError
    from orchestrator.publish.torchvision_export import NotTorchvisionEquivalent
    from orchestrator.runtime import NotRetried
    from orchestrator.spec import SpecError
    from orchestrator.stack import StackError
    from orchestrator.storage import NotFound, UnsupportedURL
    from orchestrator.tracking.uri import TrackingURIUnset
    from orchestrator.train import NonFiniteLoss

    found = [
        (SpecError, 2, ValueError),
        (PreflightError, 2, ValueError),
        (UnknownModelError, 2, KeyError),
        (UnknownProtocolError, 2, ValueError),
        (EnsembleError, 2, ValueError),
        (CheckpointRefError, 2, ValueError),
        (PlanError, 2, ValueError),
        (LayerResponsesError, 2, ValueError),
        (NotTorchvisionEquivalent, 2, ValueError),
        (PublishError, 2, RuntimeError),
        (StackError, 2, RuntimeError),
        (DataError, 2, RuntimeError),
        (DataUnavailable, 1, RuntimeError),
        (NotFound, 1, FileNotFoundError),
        (JobFailed, 1, RuntimeError),
        (NotRetried, 1, RuntimeError),
        (WeightsChangedError, 1, RuntimeError),
        (NonFiniteLoss, 1, FloatingPointError),
        (LedgerError, 2, ValueError),
        (LeaseHeld, 2, RuntimeError),
        (UnsafeCheckpointError, 2, RuntimeError),
        (BadShard, 2, RuntimeError),
        (UnsupportedURL, 2, ValueError),
        (TrackingURIUnset, 2, RuntimeError),
    ]
    return {cls.__name__: (cls, code, builtin) for cls, code, builtin in found}


def _exception_classes_in_the_source() -> set[str]:
    """Every class under orchestrator/ that derives from an exception, by its source."""
    bases: dict[str, set[str]] = {}
    for path in (ROOT / "orchestrator").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = {
                    b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases
                }
    builtin = {
        name
        for name, value in vars(builtins).items()
        if isinstance(value, type) and issubclass(value, BaseException)
    }
    errors: set[str] = set()
    while True:
        more = {name for name, of in bases.items() if of & (builtin | errors)} - errors
        if not more:
            return errors
        errors |= more


ERROR_NAMES = (
    "SpecError",
    "PreflightError",
    "UnknownModelError",
    "UnknownProtocolError",
    "EnsembleError",
    "CheckpointRefError",
    "PlanError",
    "LayerResponsesError",
    "NotTorchvisionEquivalent",
    "PublishError",
    "StackError",
    "DataError",
    "DataUnavailable",
    "NotFound",
    "JobFailed",
    "NotRetried",
    "WeightsChangedError",
    "NonFiniteLoss",
    "LedgerError",
    "LeaseHeld",
    "UnsafeCheckpointError",
    "BadShard",
    "UnsupportedURL",
    "TrackingURIUnset",
)


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_every_user_facing_error_has_the_base_and_keeps_its_builtin(name: str) -> None:
    from orchestrator.runtime import retryable

    cls, code, builtin = _classes()[name]
    error = cls(["one problem"]) if name == "PreflightError" else cls("what to fix")
    assert isinstance(error, OrchestratorError) and error.exit_code == code, name
    assert isinstance(error, builtin), f"{name} is no longer a {builtin.__name__}"
    if code == 2:
        assert not retryable(error), f"{name}: bad input cannot pass on a restart"


def test_no_exception_class_is_left_off_the_base_unsaid() -> None:
    assert set(_classes()) == set(ERROR_NAMES)
    listed = set(ERROR_NAMES) | OFF_THE_BASE | {"OrchestratorError", "UsageError"}
    assert _exception_classes_in_the_source() == listed


def test_job_failed_survives_pickling_with_its_cause() -> None:
    from orchestrator.launch import JobFailed

    back = pickle.loads(pickle.dumps(JobFailed("job x failed at step 3", "NonFiniteLoss: nan")))
    assert type(back) is JobFailed and str(back) == "job x failed at step 3"
    assert back.error == "NonFiniteLoss: nan" and back.exit_code == 1


def test_retryability_is_unchanged_where_a_restart_may_help() -> None:
    from orchestrator.data.manifest import DataUnavailable
    from orchestrator.launch import JobFailed
    from orchestrator.runtime import retryable
    from orchestrator.storage import NotFound

    for error in (DataUnavailable("store down"), JobFailed("lost"), NotFound("x"), OSError()):
        assert retryable(error), error


# ------------------------------------------------------------------------------ every entry point

ENTRY_POINTS = [
    ["-m", "orchestrator.ensemble_eval"],
    ["-m", "orchestrator.publish"],
    ["-m", "orchestrator.plan"],
    ["-m", "orchestrator.stack"],
    ["-m", "orchestrator.tracking.liveness"],
    ["-m", "orchestrator.paper.layer_responses"],
    ["-m", "orchestrator.data.ledger"],
    ["jobs/smoke.py"],  # launch.main: every job file
    ["jobs/cifar10_table6.py"],  # orchestrator.study's main: every study file
    ["jobs/ensemble_eval.py"],
]


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda e: e[-1])
def test_every_entry_point_answers_help_and_refuses_a_bad_argument(
    entry: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """In this process (run_main: the entry point's own __main__ code, not a child each)."""
    code, out, err = run_main([*entry, "--help"], capsys)
    assert code == 0, err[-3000:]
    assert "usage:" in out
    code, out, err = run_main([*entry, "--no-such-flag"], capsys)
    assert code == 2, err[-3000:]
    assert "error:" in err.strip().splitlines()[-1], err[-3000:]
    assert "Traceback" not in err, err[-3000:]


# --------------------------------------------------------------- the end of a command's process

EXIT_PROBE = """
import atexit, concurrent.futures, os, sys, tempfile, threading, time
sys.path.insert(0, {root!r})
from orchestrator.cli import run_cli

OUT = sys.argv[1]


def mark(name):
    open(os.path.join(OUT, name), "w").close()


sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
import teardown_marker  # its object's __del__ runs as the interpreter's teardown clears modules

teardown_marker.KEEP.path = os.path.join(OUT, "teardown")


def main(argv):
    atexit.register(mark, "atexit")
    threading.Thread(target=lambda: (time.sleep(0.3), mark("thread"))).start()  # not a daemon
    concurrent.futures.ThreadPoolExecutor(1).submit(lambda: (time.sleep(0.3), mark("pool")))
    globals()["TMP"] = tempfile.TemporaryDirectory()  # removed by an atexit finalizer
    with open(os.path.join(OUT, "tmpdir"), "w") as f:
        f.write(TMP.name)
    sys.stdout.write("buffered, no newline")
    return 3


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
"""


TEARDOWN_MARKER = """
class Marker:
    path = ""

    def __del__(self, _open=open):  # builtins are gone by then: open is bound here
        with _open(self.path, "w"):
            pass


KEEP = Marker()
"""


@pytest.mark.parametrize("how", ["program", "in another program"])
def test_a_command_ends_as_python_would_its_teardown_skipped_only_as_the_program(
    tmp_path: Path, how: str
) -> None:
    """`python FILE` (the command is the program): the exit code, the non-daemon thread, the
    thread pool's task, every atexit function (a temporary folder removed), the buffered output,
    all as Python's own exit gives them, and no teardown (a __main__ global's __del__ never
    runs). Run by another program in its process (`python -c` and runpy, as a test runner or a
    notebook would), the same command leaves the exit to Python: the teardown runs."""
    probe = tmp_path / "probe.py"
    probe.write_text(EXIT_PROBE.format(root=str(ROOT)))
    (tmp_path / "teardown_marker.py").write_text(TEARDOWN_MARKER)
    out = tmp_path / "out"
    out.mkdir()
    if how == "program":
        cmd = [sys.executable, str(probe), str(out)]
    else:
        # a program with arguments of its own that runs the command in its process
        runner = (
            "import os, runpy, sys; sys.argv = [os.environ['PROBE'], os.environ['OUT']]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')"
        )
        cmd = [sys.executable, "-c", runner, "--its-own-option"]
    env = {**os.environ, "PROBE": str(probe), "OUT": str(out)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, env=env)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered, no newline", proc.stdout
    made = {p.name for p in out.iterdir()}
    assert {"atexit", "thread", "pool", "tmpdir"} <= made, made
    assert not Path((out / "tmpdir").read_text()).exists()
    assert ("teardown" in made) == (how == "in another program"), made


@pytest.mark.parametrize(
    ("orig_argv", "argv", "expected"),
    [
        (["python", "jobs/x.py", "a", "b"], ["jobs/x.py", "a", "b"], True),
        (["python", "-u", "jobs/x.py", "a"], ["jobs/x.py", "a"], True),  # torchrun's workers
        (["python", "jobs/x.py"], ["jobs/x.py"], True),
        # an xdist worker running a command with runpy: its own arguments are not the command's
        (["python", "-c", "import sys;exec(eval(sys.stdin.readline()))"], ["/r/jobs/x.py"], False),
        (["python", "-m", "pytest", "a"], ["/r/jobs/x.py", "a"], False),
        (["python", "-m", "pytest"], ["/r/jobs/x.py"], False),
        (["python", "jobs/x.py", "a"], ["jobs/x.py", "b"], False),
    ],
)
def test_the_program_is_told_from_a_command_run_in_another_programs_process(
    monkeypatch: pytest.MonkeyPatch, orig_argv: list[str], argv: list[str], expected: bool
) -> None:
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    monkeypatch.setattr(sys, "argv", argv)
    assert is_the_program() is expected


def test_python_m_is_the_program_where_its_module_is_main(monkeypatch: pytest.MonkeyPatch) -> None:
    main_file = "/r/orchestrator/stack.py"  # what `python -m` makes __main__ and sys.argv[0]
    main = types.ModuleType("__main__")
    main.__file__ = main_file
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "orchestrator.stack", "up"])
    monkeypatch.setattr(sys, "argv", [main_file, "up"])
    assert is_the_program()
    monkeypatch.setattr(sys, "argv", ["/elsewhere/stack.py", "up"])
    assert not is_the_program()


def test_only_the_main_thread_ends_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "orig_argv", ["python", "jobs/x.py"])
    monkeypatch.setattr(sys, "argv", ["jobs/x.py"])
    seen: list[bool] = []
    thread = threading.Thread(target=lambda: seen.append(is_the_program()))
    thread.start()
    thread.join()
    assert seen == [False] and is_the_program()
