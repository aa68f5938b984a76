"""One trial of a `--local` study: `python -m orchestrator.study.trial SPEC.json --local`.

The study driver writes the trial's resolved spec to SPEC.json; this runs it as a job file
would (pre-flight, then the loop here or under torchrun for N workers)."""

from __future__ import annotations

import json
import sys

from orchestrator.launch import main
from orchestrator.spec import JobSpec, SpecError, from_dict


def run(argv: list[str]) -> int:
    if not argv or not argv[0].endswith(".json"):
        print("usage: python -m orchestrator.study.trial SPEC.json [--local]", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        data = json.load(f)
    try:
        spec = from_dict(JobSpec, data)
    except SpecError as err:
        print(f"error: {argv[0]}: {err}", file=sys.stderr)
        return 2
    return main(spec, argv[1:])


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1:]))
