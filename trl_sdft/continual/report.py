"""Retention metrics, the Markdown table and the plot, from the results of a continual-learning run (pure)."""

import os
from statistics import mean, pstdev

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
    earlier_final: mean accuracy at the end on every task but the last (what was kept of them; None with one task);
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
        "earlier_final": mean(last[: num_tasks - 1]) if num_tasks > 1 else None,
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
        matrices = [accuracy_matrix(run, names) for run in runs]
        matrix = _mean_matrices(matrices)
        per_seed = [retention_metrics(m, len(names) - 1) for m in matrices]
        summary.append(
            {
                "label": label,
                "method": runs[0]["method"],
                "alpha": runs[0]["alpha"],
                "learning_rate": runs[0]["learning_rate"],
                "steps": runs[0].get("steps"),
                "variant": runs[0].get("variant"),
                "seeds": [run["seed"] for run in runs],
                "columns": names,
                "matrix": matrix,
                **retention_metrics(matrix, len(names) - 1),
                # the spread over seeds: population standard deviation of each seed's metric
                "spread": {
                    key: None if per_seed[0][key] is None else pstdev(m[key] for m in per_seed)
                    for key in SPREAD_METRICS
                },
            }
        )
    return summary


SPREAD_METRICS = ("learned", "final", "forgetting", "earlier_final", "probes_final")
# The Pareto picture's axes: x = learned; y = what is kept of earlier tasks, and of the general probes.
PARETO_RETENTION = (("earlier_final", "earlier tasks at the end"), ("probes_final", "general probes at the end"))


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (higher is better), by increasing x."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((ox >= x and oy >= y) and (ox > x or oy > y) for j, (ox, oy) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def pareto_table(results: dict) -> str:
    """Each point's learning and retention, mean ± spread over seeds, and whether it is on its method's front."""
    summary = results.get("summary") or summarize(results)
    lines = [
        "| run | method | seeds | learned (x) | earlier tasks at the end | probes at the end | forgetting | "
        "front (earlier / probes) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    on_front = {}
    for key, _ in PARETO_RETENTION:
        for method in ("sft", "sdft"):
            entries = [e for e in summary if e["method"] == method and e[key] is not None]
            for i in pareto_front([(e["learned"], e[key]) for e in entries]):
                on_front.setdefault(entries[i]["label"], set()).add(key)

    def cell(entry, key):
        value, spread = entry[key], entry.get("spread", {}).get(key)
        if value is None:
            return "–"
        return f"{value:.0%}" + (f" ± {spread:.0%}" if spread is not None and len(entry["seeds"]) > 1 else "")

    for entry in summary:
        marks = on_front.get(entry["label"], set())
        front = " / ".join("yes" if key in marks else "no" for key, _ in PARETO_RETENTION)
        forgetting = entry["forgetting"]
        lines.append(
            f"| {entry['label']} | {entry['method'].upper()} | {len(entry['seeds'])} | {cell(entry, 'learned')} | "
            f"{cell(entry, 'earlier_final')} | {cell(entry, 'probes_final')} | "
            f"{'–' if forgetting is None else _signed(forgetting)} | {front} |"
        )
    return "\n".join(lines)


def pareto_plot(results: dict, path: str) -> None:
    """Learning (x) against retention (y: earlier tasks; general probes), one marker per run label, seeds as error
    bars, each method's front as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results.get("summary") or summarize(results)
    fig, axes = plt.subplots(1, len(PARETO_RETENTION), figsize=(6.4 * len(PARETO_RETENTION), 5.0), squeeze=False)
    colors = {"sft": "tab:orange", "sdft": "tab:blue"}
    for ax, (key, title) in zip(axes[0], PARETO_RETENTION):
        for method in ("sft", "sdft"):
            entries = [e for e in summary if e["method"] == method and e[key] is not None]
            for entry in entries:
                spread = entry.get("spread", {})
                ax.errorbar(
                    entry["learned"],
                    entry[key],
                    xerr=spread.get("learned") or 0,
                    yerr=spread.get(key) or 0,
                    fmt="s" if method == "sft" else "o",
                    color=colors[method],
                    markersize=5,
                    capsize=2,
                    alpha=0.85,
                )
                ax.annotate(
                    entry["label"],
                    (entry["learned"], entry[key]),
                    fontsize=6,
                    alpha=0.8,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
            front = pareto_front([(e["learned"], e[key]) for e in entries])
            if front:
                ax.plot(
                    [entries[i]["learned"] for i in front],
                    [entries[i][key] for i in front],
                    "-" if method == "sdft" else "--",
                    color=colors[method],
                    label=f"{method.upper()} front",
                )
        ax.set_xlabel("learned: accuracy on each task right after training it")
        ax.set_ylabel(f"retention: {title}")
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower left")
        else:  # e.g. earlier tasks with a single task
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes, alpha=0.6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    """retention.md and retention.png (every run label across stages); pareto.md and pareto.png (learning against
    retention, seeds as spread) once there are runs."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "retention.md"), "w") as f:
        f.write(markdown_table(results) + "\n")
    plot(results, os.path.join(output_dir, "retention.png"))
    if results.get("runs"):
        with open(os.path.join(output_dir, "pareto.md"), "w") as f:
            f.write("# Learning against retention, per run label (mean ± spread over seeds)\n\n")
            f.write(pareto_table(results) + "\n")
        pareto_plot(results, os.path.join(output_dir, "pareto.png"))
