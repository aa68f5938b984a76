"""What every command line shares: the logging set-up and the wrapper that turns errors into exit
codes.

    def main(argv: Sequence[str] | None = None) -> int:
        return run_cli(_main, argv)

`run_cli` sets up logging (level from ORCH_LOG_LEVEL, one format), runs the entry point, and
ends an `orchestrator.errors.OrchestratorError` with one `error: <message>` on stderr and the
error's exit code (2 for bad input), Ctrl-C with 130. Anything else propagates with its
traceback: a bug or a failed job should show where it happened. argparse's own usage errors
exit 2 as they always do. Where the process was started to run the command (`python FILE ...`,
`python -m MODULE ...`), it then ends without the interpreter's teardown (`exit_without_teardown`):
1-2 s of CPU at the end of every job and command that imported torch, Ray or MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import textwrap
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from orchestrator.errors import OrchestratorError, UsageError
from orchestrator.tracking.redaction import scrub

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVEL_ENV = "ORCH_LOG_LEVEL"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def setup_logging(default_level: str = "INFO") -> None:
    """Log to stderr at ORCH_LOG_LEVEL (else `default_level`) in the one format. Does nothing
    where logging is set up already (a second call, Ray's or pytest's handlers): never twice."""
    level = os.environ.get(LOG_LEVEL_ENV, default_level).strip().upper()
    if level not in LOG_LEVELS:
        raise UsageError(
            f"{LOG_LEVEL_ENV}={os.environ.get(LOG_LEVEL_ENV)!r} is not a log level: "
            f"use one of {', '.join(LOG_LEVELS)}"
        )
    logging.basicConfig(level=level, format=LOG_FORMAT)


def run_cli(
    main: Callable[[list[str]], int | None],
    argv: Sequence[str] | None = None,
    log_level: str = "INFO",
) -> int:
    """Run `main` on `argv` (default: sys.argv[1:]) and return its exit code: 0 for None, an
    OrchestratorError's `exit_code` (its message on stderr), 130 for Ctrl-C."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        setup_logging(log_level)
        code = main(args)
    except OrchestratorError as err:
        print(f"error: {scrub(str(err))}", file=sys.stderr)
        code = err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    code = 0 if code is None else code
    if argv is None and is_the_program():
        exit_without_teardown(code)
    return code


def is_the_program() -> bool:
    """Whether this process was started to run the command now ending: the interpreter's own
    arguments end with its script as given, or `-m` and its module, then its arguments (a test
    runner or a notebook that runs it in its own process, with sys.argv set, is not)."""
    n, given = len(sys.argv), sys.orig_argv
    if threading.current_thread() is not threading.main_thread() or len(given) <= n:
        return False
    if given[len(given) - n + 1 :] != sys.argv[1:]:
        return False
    if given[len(given) - n] == sys.argv[0]:  # python [options] FILE ARGS
        return True
    # python [options] -m MODULE ARGS: sys.argv[0] is then the module's file
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return given[len(given) - n - 1] == "-m" and main_file == sys.argv[0]


def exit_without_teardown(code: int) -> NoReturn:
    """End this process with `code` as Python's own exit would, less its teardown: first what
    a normal exit does (wait for the non-daemon threads and thread pools; run every atexit
    function: Ray's disconnect, MLflow's and logging's flushes, temporary folders' removal,
    loader workers' ends), then flush every stream and leave. The teardown only frees each
    module and object one by one: 1-2 s of CPU at the end of a job that imported torch, Ray
    and MLflow (docs/benchmarks.md, bench/job_exit.py)."""
    import atexit
    import ctypes

    # the two steps of Python's exit before its teardown, in its order: private names, the
    # interpreter's own (tests/test_cli.py holds them to what a normal exit does)
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone: nothing left to lose
            pass
    try:
        ctypes.CDLL(None).fflush(None)  # C libraries' buffered output (stdio, C++ streams)
    except (OSError, AttributeError):
        pass
    os._exit(code)


# the longest value `keys_help` shows on a key's line; longer ones end in "..."
HELP_VALUE_WIDTH = 70


def keys_help(config: Any, intro: str) -> str:
    """Every key of config dataclass `config` (a job file's spec) with its value, one line per
    key, grouped by section, after `intro`: what a job file's --help lists."""
    rows: list[tuple[str, str | None]] = []  # (dotted key, its value) or (section heading, None)

    def walk(node: Any, prefix: str) -> None:
        keys = [(f.name, getattr(node, f.name)) for f in dataclasses.fields(node)]
        rows.extend((prefix + k, _shown(v)) for k, v in keys if not dataclasses.is_dataclass(v))
        for name, value in keys:  # a section's own keys first, then its sections
            if dataclasses.is_dataclass(value):
                rows.append((f"{prefix}{name}:", None))
                walk(value, f"{prefix}{name}.")

    walk(config, "")
    width = max(len(key) for key, value in rows if value is not None)
    lines = [
        intro,
        *(key if value is None else f"  {key:<{width}}  {value}" for key, value in rows),
    ]
    return "\n".join(lines)


def _shown(value: Any) -> str:
    """A value as an override spells it: text bare, everything else as JSON."""
    text = value if isinstance(value, str) and value else json.dumps(value)
    return text if len(text) <= HELP_VALUE_WIDTH else text[: HELP_VALUE_WIDTH - 3] + "..."


def job_keys_help(
    spec: Any, adjusted: bool, dry_run: str = "prints the resolved spec and runs the pre-flight"
) -> str:
    """A job file's --help epilog: how an override is written, then `keys_help` of its spec;
    `adjusted`: the job file adjusts the spec after the overrides; `dry_run`: what it does."""
    then = " This job file adjusts the spec after the overrides (its docstring says how)."
    how = textwrap.fill(
        "Overrides: section.key=VALUE, VALUE as JSON where it parses (0.2, true, null, "
        f"[32000,48000]), else as text. --dry-run {dry_run}.{then if adjusted else ''}",
        88,
        break_on_hyphens=False,
    )
    return keys_help(spec, f"{how}\n\nkeys, with this job file's values:")
