"""Retention metrics, the Markdown table and the plot, from the results of a continual-learning run (pure)."""

import os
from statistics import mean

from .tasks import PROBES


def _task_names(results: dict) -> list[str]:
    return [t["name"] for t in results["tasks"] if t["name"] != PROBES]


def accuracy_matrix(run: dict, names: list[str]) -> list[list[float]]:
    """Rows: stages 0..K; columns: `names`."""
    return [[stage["scores"][name]["accuracy"] for name in names] for stage in run["stages"]]


def _mean_matrices(matrices: list[list[list[float]]]) -> list[list[float]]:
    return [[mean(values) for values in zip(*rows)] for rows in zip(*matrices)]


def retention_metrics(matrix: list[list[float]], num_tasks: int) -> dict:
    """From an accuracy matrix whose first `num_tasks` columns are the tasks in training order and the last the probes.

    learned: mean accuracy on each task right after training it; final: mean task accuracy after the last stage;
    forgetting: mean drop from right-after-training to the end over every task but the last (None with one task);
    probes: base and final accuracy on the prior-capability probes.
    """
    last = matrix[-1]
    learned = [matrix[k + 1][k] for k in range(num_tasks)]
    drops = [matrix[k + 1][k] - last[k] for k in range(num_tasks - 1)]
    return {
        "base": mean(matrix[0][:num_tasks]),
        "learned": mean(learned),
        "final": mean(last[:num_tasks]),
        "forgetting": mean(drops) if drops else None,
        "probes_base": matrix[0][-1],
        "probes_final": last[-1],
        "probes_drop": matrix[0][-1] - last[-1],
    }


def summarize(results: dict) -> list[dict]:
    """One entry per run label (method, alpha, learning rate), averaged over its seeds."""
    names = [*_task_names(results), PROBES]
    groups: dict[str, list[dict]] = {}
    for run in results.get("runs", []):
        groups.setdefault(run["label"], []).append(run)
    summary = []
    for label, runs in groups.items():
        matrix = _mean_matrices([accuracy_matrix(run, names) for run in runs])
        summary.append(
            {
                "label": label,
                "method": runs[0]["method"],
                "alpha": runs[0]["alpha"],
                "learning_rate": runs[0]["learning_rate"],
                "seeds": [run["seed"] for run in runs],
                "columns": names,
                "matrix": matrix,
                **retention_metrics(matrix, len(names) - 1),
            }
        )
    return summary


def _pct(value) -> str:
    return "–" if value is None else f"{value:.0%}"


def _signed(value) -> str:
    return "–" if value is None else f"{value * 100:+.0f} pts"


def markdown_table(results: dict) -> str:
    """The summary table and, per run label, the accuracy after every stage."""
    config = results["config"]
    names = _task_names(results)
    lines = [
        "# Continual learning: SFT vs SDFT",
        "",
        f"Model `{config['model']}`; tasks in order: {', '.join(names)}; {config['steps']} optimizer steps per task, "
        f"{config['batch_size']} sequences per step, learning rates {config['learning_rates']}, seeds "
        f"{config['seeds']}; greedy evaluation; stage 0 is the base model.",
        "",
    ]
    check = results.get("teacher_check") or {}
    if check:
        lines += ["In-context teacher check (base model, test rows with their privileged context):", ""]
        lines += ["| task | student | in-context teacher | clearly better |", "|---|---|---|---|"]
        for name, row in check.items():
            clear = "–" if row["clear"] is None else ("yes" if row["clear"] else "**no**")
            lines.append(f"| {name} | {_pct(row['student'])} | {_pct(row['teacher'])} | {clear} |")
        lines.append("")
    summary = results.get("summary") or summarize(results)
    if summary:
        lines += [
            "| run | learned (right after each task) | final (mean over tasks) | forgetting of earlier tasks | "
            "probes (base → final) |",
            "|---|---|---|---|---|",
        ]
        for entry in summary:
            lines.append(
                f"| {entry['label']} | {_pct(entry['learned'])} | {_pct(entry['final'])} | "
                f"{_signed(entry['forgetting'])} | {_pct(entry['probes_base'])} → {_pct(entry['probes_final'])} |"
            )
        lines.append("")
        for entry in summary:
            seeds = entry["seeds"]
            lines += [
                f"## {entry['label']}" + (f" (mean of seeds {seeds})" if len(seeds) > 1 else f" (seed {seeds[0]})"),
                "",
            ]
            lines += [
                "| after stage | " + " | ".join(entry["columns"]) + " |",
                "|---" * (len(entry["columns"]) + 1) + "|",
            ]
            for stage, row in enumerate(entry["matrix"]):
                name = "0: base" if stage == 0 else f"{stage}: {names[stage - 1]}"
                lines.append(f"| {name} | " + " | ".join(_pct(v) for v in row) + " |")
            lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """Accuracy per task (and the probes) across stages, one line per run label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = _task_names(results)
    columns = [*names, PROBES]
    summary = results.get("summary") or summarize(results)
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.4), sharey=True, squeeze=False)
    stages = list(range(len(names) + 1))
    ticks = ["base", *names]
    for index, (ax, column) in enumerate(zip(axes[0], columns)):
        for entry in summary:
            values = [row[index] for row in entry["matrix"]]
            style = "--" if entry["method"] == "sft" else "-"
            ax.plot(stages, values, style, marker="o", markersize=3, label=entry["label"])
        if column in names:
            ax.axvline(names.index(column) + 1, color="grey", linestyle=":", linewidth=1)
        ax.set_title(column)
        ax.set_xticks(stages, ticks, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy after stage")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08 + 0.04 * ((len(labels) - 1) // 4), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(results: dict, output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "retention.md"), "w") as f:
        f.write(markdown_table(results) + "\n")
    plot(results, os.path.join(output_dir, "retention.png"))
