"""`python -m orchestrator.plan`: see orchestrator/plan/cli.py."""

import sys

from orchestrator.plan.cli import main

sys.exit(main())
