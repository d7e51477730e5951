"""The documentation's plots, drawn from `benchmarks/results/*.json` (used by `scripts/docs_pages.py`).

Each figure is an SVG written under `docs/assets/plots/` and shown beside the table it draws. SVG text is reproducible
here (fixed hash salt, `SOURCE_DATE_EPOCH` for the date, text kept as text, which keeps the files small), so
`docs_pages.py --check` finds a stale plot the way it finds a stale table: by comparing what it would write.
"""

import json
import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PLOTS = "docs/assets/plots"
OURS, PEER, OTHER = "#3f51b5", "#9e9e9e", "#ff9800"


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def pyplot():
    os.environ.setdefault("SOURCE_DATE_EPOCH", "0")  # the SVG's date: fixed (this script owns its process)
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams.update({"svg.hashsalt": "trl-sdft-docs", "svg.fonttype": "none", "font.size": 9})
    import matplotlib.pyplot as plt

    return plt


def svg_text(fig) -> str:
    plt = pyplot()
    with tempfile.TemporaryDirectory(prefix="docs-plot-") as directory:
        path = os.path.join(directory, "plot.svg")
        fig.savefig(path, format="svg", bbox_inches="tight", metadata={"Date": None})
        plt.close(fig)
        return Path(path).read_text()


def throughput_figure() -> str:
    """Completion tokens trained per second and step time, ours against TRL's trainer, each workload at each side's
    defaults (bf16) and at float32."""
    plt = pyplot()
    summary = load("step_throughput.json")["summary"]
    cases = [("peer", "ours"), ("peer-fp32", "ours-fp32")]
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
    for ax, key, label in ((axes[0], "tokens_per_s", "completion tokens / s"), (axes[1], "step_s", "step (s)")):
        names, peer, ours = [], [], []
        for workload in ("forced", "natural"):
            rows = {r["case"]: r for r in summary if r["workload"] == workload}
            for peer_case, our_case in cases:
                if peer_case in rows and our_case in rows:
                    names.append(f"{workload}\n{'fp32' if 'fp32' in peer_case else 'defaults'}")
                    peer.append(rows[peer_case][key])
                    ours.append(rows[our_case][key])
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], peer, width=0.4, color=PEER, label="TRL's SDFT")
        ax.bar([i + 0.2 for i in x], ours, width=0.4, color=OURS, label="trl-sdft")
        ax.set_xticks(list(x), names)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    fig.legend(
        *axes[0].get_legend_handles_labels(), frameon=False, ncol=2, loc="lower center", bbox_to_anchor=(0.5, 1.0)
    )
    axes[0].set_title("higher is better")
    axes[1].set_title("lower is better (tokens per step differ: see the table)")
    return svg_text(fig)


def memory_figure() -> str:
    """Peak extra memory of the loss alone, per method, at each size (full_logits)."""
    plt = pyplot()
    results = [r for r in load("loss_memory.json")["results"] if r["mode"] == "full_logits"]
    sizes = sorted({r["size"] for r in results}, key=lambda s: int(s.split("x")[1]))
    fig, axes = plt.subplots(1, len(sizes), figsize=(8, 2.8), sharey=False)
    for ax, size in zip(axes, sizes):
        rows = [r for r in results if r["size"] == size]
        labels = [r["method"] + (f" ({r['chunk']})" if r["method"] == "chunked" else "") for r in rows]
        colors = [OURS if r["method"] in ("chunked", "liger") else PEER for r in rows]
        ax.barh(labels, [r["peak_extra_mib"] for r in rows], color=colors)
        ax.invert_yaxis()
        ax.set_xlabel("peak extra memory (MiB)")
        ax.set_title(f"full_logits loss, {size} tokens")
        ax.grid(axis="x", alpha=0.3)
    return svg_text(fig)


def async_figure() -> str:
    """Median step time split into waiting for the server and the rest, synchronous against asynchronous rounds."""
    plt = pyplot()
    summary = load("async_rollouts.json")["summary"]
    fig, ax = plt.subplots(figsize=(6, 2.0))
    labels = ["synchronous", "async_rollouts"]
    waits = [summary[c]["wait_s"] for c in ("sync", "async")]
    rest = [summary[c]["step_s"] - summary[c]["wait_s"] for c in ("sync", "async")]
    ax.barh(labels, rest, color=OURS, label="training (and the rest of the step)")
    ax.barh(labels, waits, left=rest, color=OTHER, label="waiting for the server")
    for i, case in enumerate(("sync", "async")):
        s = summary[case]
        ax.text(s["step_s"] + 0.1, i, f"{s['step_s']:.2f} s, {s['tokens_per_step']:.0f} tokens", va="center")
    ax.invert_yaxis()
    ax.set_xlim(0, max(s["step_s"] for s in summary.values() if isinstance(s, dict)) * 1.6)
    ax.set_xlabel("median step (s)")
    ax.legend(frameon=False, ncol=2, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    return svg_text(fig)


def continual_figure(kind: str) -> str:
    """The harness's own plots (`trl_sdft.continual.report`): the Pareto grid's fronts (`pareto`), or accuracy across
    the stages of the main comparison (`retention`)."""
    from trl_sdft.continual import report

    pyplot()
    results = load("pareto/retention.json" if kind == "pareto" else "continual/retention.json")
    with tempfile.TemporaryDirectory(prefix="docs-plot-") as directory:
        path = os.path.join(directory, f"{kind}.svg")
        (report.pareto_plot if kind == "pareto" else report.plot)(results, path)
        return Path(path).read_text()


STEP_BOXES = {  # name: (x, y, text); the data flow of one step (docs/concepts/step.md)
    "rows": (0.5, 9.0, "Rows: prompt, privileged_context"),
    "prompts": (0.5, 7.9, "Student and teacher prompts, tokenized\nbatch.py"),
    "rollout": (0.5, 6.6, "Rollout backend: transformers, vLLM, registered\nrollouts/"),
    "batch": (0.5, 5.3, "Padded batch with the rollout log-probs it needs\nbatch.py, importance.py"),
    "student": (0.27, 4.0, "Student forward on\nprompt + completion\nforwards.py"),
    "teacher": (0.73, 4.0, "Teacher score on teacher\nprompt + completion\nteachers.py"),
    "loss": (0.5, 2.7, "Per-token divergence x importance weights\nlosses.py, chunked_loss.py, importance.py"),
    "optim": (0.5, 1.5, "Backward, finite check, optimizer step\ntrainer.py, guards.py"),
    "ema": (0.5, 0.4, "EMA teacher update\nteachers.py"),
}
STEP_EDGES = [  # (from, to, label, style)
    ("rows", "prompts", "", "-"),
    ("prompts", "rollout", "generation prompts", "-"),
    ("rollout", "batch", "completions, engine log-probs", "-"),
    ("batch", "student", "", "-"),
    ("batch", "teacher", "", "-"),
    ("student", "loss", "", "-"),
    ("teacher", "loss", "", "-"),
    ("loss", "optim", "", "-"),
    ("optim", "ema", "", "-"),
]


def step_figure() -> str:
    """How one step runs, module by module: a static drawing (no script to load, so it shows offline too)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 7.2))
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.2, 9.6)
    ax.axis("off")
    style = {"boxstyle": "round,pad=0.5", "facecolor": "#e8eaf6", "edgecolor": OURS}
    for x, y, text in STEP_BOXES.values():
        ax.text(x, y, text, ha="center", va="center", bbox=style, fontsize=8.5)

    def arrow(start, end, label="", linestyle="-", connection="arc3"):
        props = {"arrowstyle": "-|>", "color": "#424242", "linestyle": linestyle, "connectionstyle": connection}
        ax.annotate("", xy=end, xytext=start, arrowprops={**props, "shrinkA": 20, "shrinkB": 20})
        if label:
            ax.text((start[0] + end[0]) / 2 + 0.02, (start[1] + end[1]) / 2, label, fontsize=7.5, color="#424242")

    for source, target, label, line in STEP_EDGES:
        arrow(STEP_BOXES[source][:2], STEP_BOXES[target][:2], label, line)
    prompts, batch = STEP_BOXES["prompts"], STEP_BOXES["batch"]
    arrow((0.14, prompts[1]), (0.14, batch[1]), "", "-", "arc3,rad=0.35")
    ax.text(0.0, (prompts[1] + batch[1]) / 2, "teacher\nprompt ids", fontsize=7.5, color="#424242")
    ema, rollout = STEP_BOXES["ema"], STEP_BOXES["rollout"]
    arrow((0.8, ema[1]), (0.86, rollout[1]), "", "--", "arc3,rad=0.25")
    ax.text(0.9, 3.4, "next\ngeneration\nround", fontsize=7.5, color="#424242")
    return svg_text(fig)


FIGURES = {
    f"{PLOTS}/step.svg": step_figure,
    f"{PLOTS}/throughput.svg": throughput_figure,
    f"{PLOTS}/memory.svg": memory_figure,
    f"{PLOTS}/async.svg": async_figure,
    f"{PLOTS}/pareto.svg": lambda: continual_figure("pareto"),
    f"{PLOTS}/retention.svg": lambda: continual_figure("retention"),
}
