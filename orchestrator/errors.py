"""The project's error base: every user-facing error carries the exit code its command ends with.

    OrchestratorError  exit 1: the work failed (a job, a trial, a store); the message says how
    UsageError         exit 2: bad input or a refusal (argument, spec, model, data): the same
                       command fails the same way until the input is fixed

`orchestrator.cli.run_cli` prints such an error as one `error: <message>` and exits with its
code. A class keeps its builtin base beside these (SpecError is a ValueError, UnknownModelError
a KeyError) where callers catch the builtin. Imports nothing: every layer may raise these.
"""

from __future__ import annotations


class OrchestratorError(Exception):
    """An error the user reads: its message names the thing and the fix; `exit_code` is what
    a command line exits with."""

    exit_code: int = 1


class UsageError(OrchestratorError):
    """Bad input or a refusal: the command exits 2, and a restart of the same job on the same
    input cannot succeed (orchestrator.runtime.retryable)."""

    exit_code = 2
    retryable = False
