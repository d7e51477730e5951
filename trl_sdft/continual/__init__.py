"""Continual learning: train tasks in sequence with SFT or SDFT and measure what each method keeps.

    from trl_sdft.continual import ContinualConfig, run_continual
    run_continual(ContinualConfig(tasks=["facts", "tool_call", "identity"], steps=30))

or `python scripts/continual.py --method both --tasks facts,tool_call,identity --steps 30`.
"""

from .harness import ContinualConfig, ContinualRunner, RunSpec, evaluate, run_continual, run_specs
from .report import markdown_table, retention_metrics, summarize, write_reports
from .tasks import BUNDLED_TASKS, Task, TaskError, load_task, load_tasks, make_scorer, probes_task, task_from_rows

__all__ = [
    "BUNDLED_TASKS",
    "ContinualConfig",
    "ContinualRunner",
    "RunSpec",
    "Task",
    "TaskError",
    "evaluate",
    "load_task",
    "load_tasks",
    "make_scorer",
    "markdown_table",
    "probes_task",
    "retention_metrics",
    "run_continual",
    "run_specs",
    "summarize",
    "task_from_rows",
    "write_reports",
]
