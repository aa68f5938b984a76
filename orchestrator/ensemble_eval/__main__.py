"""`python -m orchestrator.ensemble_eval [flags]`."""

from orchestrator.ensemble_eval.driver import main

if __name__ == "__main__":
    raise SystemExit(main())
