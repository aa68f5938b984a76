"""Studies: the paper's experiments as declared grids of ordinary jobs, run on Ray Tune.

A study file in jobs/ declares the recipe (a JobSpec), the cells (`grid({...})`: model.name
over depths, model.shortcut over A/B/C, ...) and the seeds, and ends with `main(STUDY)`:

    ray job submit -- python jobs/cifar10_table6.py

- orchestrator.study.grid: the grid -> trial specs (names derived from study, cell, seed);
- orchestrator.study.run: the trials on Ray Tune, or `--local` one after another;
- orchestrator.study.parent: the MLflow parent run, trials nested under it;
- orchestrator.study.results / figures: the table (mean +- std over seeds, the paper's
  number, the difference) and the paper-style figures on the parent run;
- orchestrator.study.estimate: the dry run's GPU-hours.
"""

from orchestrator.study.grid import Study, grid

__all__ = ["Study", "grid", "main"]


def main(study: Study, argv: list[str] | None = None) -> int:
    """A study file's entry point (orchestrator.study.cli)."""
    from orchestrator.study.cli import main as run

    return run(study, argv)
