"""What every command line shares: the logging set-up and the wrapper that turns errors into exit
codes.

    def main(argv: Sequence[str] | None = None) -> int:
        return run_cli(_main, argv)

`run_cli` sets up logging (level from ORCH_LOG_LEVEL, one format), runs the entry point, and
ends an `orchestrator.errors.OrchestratorError` with one `error: <message>` on stderr and the
error's exit code (2 for bad input), Ctrl-C with 130. Anything else propagates with its
traceback: a bug or a failed job should show where it happened. argparse's own usage errors
exit 2 as they always do.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

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
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0 if code is None else code


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
