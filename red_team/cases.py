"""The cases that need Python: a check of their own (what a handled run must have done) or a setup the table's steps
cannot say (Parquet rows changed, a JSONL line cut). Each is listed in `cases.yaml` with `python: true`, which holds
its expected outcome and category; the function returns the case's plan."""

import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from red_team.checks import (
    SURROGATE,
    accepted,
    digest,
    model_saved,
    no_code_ran,
    poison_weights,
    pwn_tag,
    rewrite_parquet,
    truncate,
    weights_problem,
)
from red_team.processes import PYTHON, SDFT, Result
from red_team.workspace import Ctx, Plan, SetupError, conversations

BUILDS: dict[str, Callable[[Ctx], Plan]] = {}


def build(name: str):
    """Registers the build of the case `name` (its table entry says `python: true`)."""

    def register(function):
        assert name not in BUILDS, name
        BUILDS[name] = function
        return function

    return register


@build("sdft-output-finished-run-overwrite")
def _(c: Ctx) -> Plan:
    out = c.run_copy()
    old = digest(str(out / "model.safetensors"))

    def check(result: Result) -> str | None:
        if any(out.glob("checkpoint-*")):
            return "the earlier run's checkpoints were kept (a later `resume true` would pick one)"
        if digest(str(out / "model.safetensors")) == old:
            return "the earlier model was not replaced"
        return weights_problem(out)

    argv = c.sdft("--overwrite_output_dir", max_steps=1)  # 1 step: other weights than the earlier 2-step run's
    return Plan(argv, check=check, allowed=("out/**",), note="replaced, old checkpoints gone")


@build("sdft-two-runs-one-output-dir")
def _(c: Ctx) -> Plan:
    argv = c.sdft(max_steps=4)

    def winner(result: Result) -> str | None:
        if all(r.code == 0 for r in result.all):
            return "both runs exited 0 writing into one --output_dir"
        if result.code == 2 and not any(r.code == 0 for r in result.all):
            return None  # both refused: judged by the error line
        return weights_problem(c.path("out")) if result.code == 2 else None

    return Plan(argv, concurrent=[argv], always=winner)


@build("resume-true-with-checkpoints")
def _(c: Ctx) -> Plan:
    out = c.run_copy()

    def check(result: Result) -> str | None:
        state = out / "checkpoint-3" / "trainer_state.json"
        if not state.is_file():
            return "no checkpoint-3 after resuming to step 3"
        if json.loads(state.read_text()).get("global_step") != 3:
            return "checkpoint-3 is not at step 3"
        return weights_problem(out)

    argv = c.sdft(resume_from_checkpoint="true", max_steps=3, save_strategy="steps", save_steps=1)
    return Plan(argv, check=check, allowed=("out/*",), note="resumed at step 2, checkpoint-3 written")


def _second_checkpoint_rewritten(out: Path) -> str | None:
    """None when a resumed run rewrote `out/checkpoint-2` at step 2 and saved finite weights in `out`."""
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    return "checkpoint-2 not rewritten at step 2" if state.get("global_step") != 2 else weights_problem(out)


@build("resume-explicit-checkpoint")
def _(c: Ctx) -> Plan:
    out = c.run_copy()

    def check(result: Result) -> str | None:
        return _second_checkpoint_rewritten(out)

    argv = c.sdft(resume_from_checkpoint="out/checkpoint-1", save_strategy="steps", save_steps=1)
    return Plan(argv, check=check, allowed=("out/*", "out/checkpoint-2/**"), note="resumed at step 1")


@build("resume-true-newest-truncated")
def _(c: Ctx) -> Plan:
    out = c.run_copy()
    truncate(out / "checkpoint-2" / "trainer_state.json")

    def check(result: Result) -> str | None:
        if "checkpoint-2" not in result.stderr:
            return "no warning that the cut-short checkpoint-2 was skipped"
        return _second_checkpoint_rewritten(out)

    argv = c.sdft(resume_from_checkpoint="true", save_strategy="steps", save_steps=1)
    return Plan(argv, check=check, allowed=("out/*", "out/checkpoint-2/**"), note="fell back to checkpoint-1, warned")


@build("resume-ema-run-with-base-teacher")
def _(c: Ctx) -> Plan:
    out = c.run_copy("ema")

    def check(result: Result) -> str | None:
        warned = any(re.search(r"\bema\b.*teacher|teacher.*\bema\b", line, re.I) for line in result.stderr.splitlines())
        return weights_problem(out) or (None if warned else "no warning that the EMA teacher is dropped")

    argv = c.sdft(resume_from_checkpoint="true", teacher_model_kind="base", max_steps=3)
    return Plan(argv, check=check, allowed=("out/*",), note="warned: the EMA teacher is dropped")


# =============================================================================================== offline data
@build("extract-happy-path")
def _(c: Ctx) -> Plan:
    c.chats()

    def check(result: Result) -> str | None:
        import pyarrow.parquet as pq

        table = pq.read_table(c.path("t.parquet"))
        kept = c.path("kept.jsonl").read_text().splitlines()
        if table.num_rows != 12 or len(kept) != 12:
            return f"{table.num_rows} rows and {len(kept)} kept records, expected 12"
        values = [v for row in table.column("topk_values").to_pylist() for v in row]
        return None if all(math.isfinite(v) for v in values) else "non-finite logits written"

    return Plan(c.extract(), check=check, note="12 rows, finite")


@build("extract-nan-teacher")
def _(c: Ctx) -> Plan:
    c.chats()
    poison_weights(c.model_copy("teacher"))

    def check(result: Result) -> str | None:
        import pyarrow.parquet as pq

        values = [v for row in pq.read_table(c.path("t.parquet")).column("topk_values").to_pylist() for v in row]
        bad = sum(not math.isfinite(v) for v in values)
        return f"exit 0 with {bad} non-finite teacher logits stored" if bad else "exit 0 from a NaN teacher"

    return Plan(c.extract(model="teacher"), check=check)


@build("extract-corrupt-jsonl-line")
def _(c: Ctx) -> Plan:
    lines = [json.dumps(r) for r in conversations(4)]
    lines[2] = '{"messages": [{"role": "user", "content": "trunc'
    c.jsonl("chat.jsonl", lines)
    return Plan(c.extract(), check=accepted("a corrupt line was dropped silently"))


@build("extract-lone-surrogate")
def _(c: Ctx) -> Plan:
    lines = [json.dumps(r) for r in conversations(4)]
    lines[1] = (
        f'{{"messages": [{{"role": "user", "content": "hi {SURROGATE}"}}, {{"role": "assistant", "content": "ok"}}]}}'
    )
    c.jsonl("chat.jsonl", lines)
    return Plan(c.extract(), check=accepted("a lone surrogate was accepted"))


def _poisoned(c: Ctx, change, why: str) -> Plan:
    kept, logits = c.offline_files()
    rewrite_parquet(logits, c.path("bad.parquet"), change)
    return Plan(c.distill(kept=kept, logits=c.path("bad.parquet")), check=model_saved(c.path("out"), why))


@build("distill-nan-logits")
def _(c: Ctx) -> Plan:
    return _poisoned(c, lambda rows: rows[5]["topk_values"].__setitem__(3, math.nan), "NaN teacher logits accepted")


@build("distill-inf-logits")
def _(c: Ctx) -> Plan:
    return _poisoned(c, lambda rows: rows[0]["topk_values"].__setitem__(0, math.inf), "inf teacher logits accepted")


@build("distill-out-of-vocab-index")
def _(c: Ctx) -> Plan:
    vocab = len(c.assets.tokenizer())
    return _poisoned(c, lambda rows: rows[2]["topk_indices"].__setitem__(1, vocab + 7), "an index >= vocab accepted")


@build("distill-negative-index")
def _(c: Ctx) -> Plan:
    return _poisoned(c, lambda rows: rows[7]["topk_indices"].__setitem__(1, -1), "a negative index accepted")


@build("distill-parquet-rows-reordered")
def _(c: Ctx) -> Plan:
    def swap(rows):
        rows[0], rows[1] = rows[1], rows[0]

    return _poisoned(c, swap, "Parquet rows out of the JSONL's order accepted")


@build("distill-ragged-row")
def _(c: Ctx) -> Plan:
    def cut(rows):
        rows[3]["topk_indices"].pop()
        rows[3]["topk_values"].pop()

    return _poisoned(c, cut, "a row with a partial position accepted")


@build("distill-records-swapped-same-length")
def _(c: Ctx) -> Plan:
    import pyarrow.parquet as pq

    kept, logits = c.offline_files()
    records = [json.loads(line) for line in kept.read_text().splitlines()]
    lengths = [len(row) for row in pq.read_table(logits).column("topk_indices").to_pylist()]
    pair = next(
        (
            (i, j)
            for i in range(len(records))
            for j in range(i + 1, len(records))
            if lengths[i] == lengths[j] and records[i]["messages"] != records[j]["messages"]
        ),
        None,
    )
    if pair is None:
        raise SetupError("no two kept records with the same number of assistant tokens")
    a, b = pair
    records[a]["messages"], records[b]["messages"] = records[b]["messages"], records[a]["messages"]  # idx kept
    c.jsonl("kept.jsonl", records)
    return Plan(
        c.distill(kept=kept, logits=logits), check=accepted(f"records {a} and {b} trained on each other's logits")
    )


@build("distill-answer-edited-same-tokens")
def _(c: Ctx) -> Plan:
    from trl_sdft.testing import COLORS

    kept, logits = c.offline_files()
    records = [json.loads(line) for line in kept.read_text().splitlines()]
    tokenizer = c.assets.tokenizer()
    answer = records[0]["messages"][-1]["content"]
    count = len(tokenizer(answer)["input_ids"])
    edited = next(
        (
            answer.replace(COLORS[0], other)
            for other in COLORS[1:]
            if len(tokenizer(answer.replace(COLORS[0], other))["input_ids"]) == count
        ),
        None,
    )
    if edited is None or edited == answer:
        raise SetupError(f"no color gives {answer!r} the same token count")
    records[0]["messages"][-1]["content"] = edited
    c.jsonl("kept.jsonl", records)
    return Plan(c.distill(kept=kept, logits=logits), check=accepted(f"trained {edited!r} on the logits of {answer!r}"))


@build("distill-parquet-without-metadata")
def _(c: Ctx) -> Plan:
    kept, logits = c.offline_files()
    rewrite_parquet(logits, c.path("bare.parquet"), metadata={})
    return Plan(c.distill(kept=kept, logits=c.path("bare.parquet")))


@build("distill-parquet-missing-column")
def _(c: Ctx) -> Plan:
    kept, logits = c.offline_files()
    rewrite_parquet(logits, c.path("cut.parquet"), drop=["topk_values"])
    return Plan(c.distill(kept=kept, logits=c.path("cut.parquet")))


@build("distill-kept-corrupt-line")
def _(c: Ctx) -> Plan:
    kept, logits = c.offline_files()
    lines = kept.read_text().splitlines()
    lines[3] = lines[3][: len(lines[3]) // 2]
    c.jsonl("kept.jsonl", lines)
    return Plan(c.distill(kept=kept, logits=logits))


@build("distill-kept-lone-surrogate")
def _(c: Ctx) -> Plan:
    kept, logits = c.offline_files()
    lines = kept.read_text().splitlines()
    lines[0] = lines[0].replace("What color", f"What {SURROGATE} color", 1)
    c.jsonl("kept.jsonl", lines)
    return Plan(c.distill(kept=kept, logits=logits))


def _yaml_case(c: Ctx, text: str, why: str, **flags) -> Plan:
    c.write("run.yaml", text)
    return Plan(c.sdft("--config", "run.yaml", **flags), check=model_saved(c.path("out"), why))


@build("sdft-yaml-python-object-tag")
def _(c: Ctx) -> Plan:
    marker = c.path("PWNED")
    plan = _yaml_case(c, f"learning_rate: 1.0e-3\nx: {pwn_tag(marker)}\n", "a python object tag accepted")
    plan.always = no_code_ran(marker)
    return plan


def _long_rows(prompt_repeat: int = 0, context_repeat: int = 0) -> list[dict]:
    from trl_sdft.testing import facts_rows

    rows = facts_rows()
    if prompt_repeat:
        rows[2]["prompt"] = "What color is Zorbo? " * prompt_repeat
    if context_repeat:
        rows[1]["privileged_context"] = "Quilla is blue. " + "Filler words about nothing. " * context_repeat
    return rows


@build("sdft-long-prompt-with-max-prompt-length")
def _(c: Ctx) -> Plan:
    c.jsonl("rows.jsonl", _long_rows(prompt_repeat=400))
    argv = c.sdft(dataset="rows.jsonl", max_prompt_length=64)
    return Plan(argv, check=model_saved(c.path("out")), note="prompt cut from the left")


@build("sdft-long-prompt-default-length")
def _(c: Ctx) -> Plan:
    c.jsonl("rows.jsonl", _long_rows(prompt_repeat=400))
    return Plan(c.sdft(dataset="rows.jsonl"), check=model_saved(c.path("out"), "a prompt beyond the context accepted"))


@build("sdft-long-privileged-context")
def _(c: Ctx) -> Plan:
    c.jsonl("rows.jsonl", _long_rows(context_repeat=300))

    def check(result: Result) -> str | None:
        if "privileged context" not in result.stderr.lower():
            return "no warning that the privileged context is cut"
        return weights_problem(c.path("out"))

    return Plan(c.sdft(dataset="rows.jsonl"), check=check, note="context end cut, warned")


# =================================================================================================== datasets
def _dataset_case(c: Ctx, name: str, text_or_rows, why: str, **flags) -> Plan:
    if isinstance(text_or_rows, str):
        c.write(name, text_or_rows)
    else:
        c.jsonl(name, text_or_rows)
    return Plan(c.sdft(dataset=name, **flags), check=model_saved(c.path("out"), why))


def _facts(n: int = 8, chat: bool = False) -> list[dict]:
    from trl_sdft.testing import facts_rows

    return facts_rows(n, chat=chat)


@build("dataset-mixed-text-and-chat")
def _(c: Ctx) -> Plan:
    rows = _facts(4) + _facts(4, chat=True)
    return _dataset_case(c, "rows.jsonl", rows, "text and chat prompts mixed in one batch")


@build("dataset-missing-context-column")
def _(c: Ctx) -> Plan:
    rows = [{"prompt": r["prompt"], "answer": r["privileged_context"]} for r in _facts()]
    return _dataset_case(c, "rows.jsonl", rows, "no privileged_context column")


@build("dataset-missing-prompt-column")
def _(c: Ctx) -> Plan:
    rows = [{"question": r["prompt"], "privileged_context": r["privileged_context"]} for r in _facts()]
    return _dataset_case(c, "rows.jsonl", rows, "no prompt column")


@build("dataset-none-context")
def _(c: Ctx) -> Plan:
    rows = _facts()
    rows[3]["privileged_context"] = None
    return _dataset_case(c, "rows.jsonl", rows, "a None privileged_context accepted")


@build("dataset-empty-context")
def _(c: Ctx) -> Plan:
    rows = _facts()
    rows[5]["privileged_context"] = "   "
    return _dataset_case(c, "rows.jsonl", rows, "an empty privileged_context accepted")


@build("dataset-corrupt-jsonl-line")
def _(c: Ctx) -> Plan:
    lines = [json.dumps(r) for r in _facts()]
    lines[4] = lines[4][:20]
    return _dataset_case(c, "rows.jsonl", "\n".join(lines) + "\n", "a corrupt line dropped")


@build("dataset-lone-surrogate")
def _(c: Ctx) -> Plan:
    lines = [json.dumps(r) for r in _facts()]
    lines[2] = json.dumps({"prompt": "What color is X?", "privileged_context": "X is red."}).replace("X?", SURROGATE)
    return _dataset_case(c, "rows.jsonl", "\n".join(lines) + "\n", "a lone surrogate accepted")


@build("dataset-chat-ends-with-assistant")
def _(c: Ctx) -> Plan:
    rows = _facts(chat=True)
    rows[1]["prompt"] = rows[1]["prompt"] + [{"role": "assistant", "content": "red"}]
    return _dataset_case(c, "rows.jsonl", rows, "a chat prompt ending with an assistant turn")


@build("dataset-prompt-is-a-number")
def _(c: Ctx) -> Plan:
    rows = [{"prompt": i, "privileged_context": r["privileged_context"]} for i, r in enumerate(_facts())]
    return _dataset_case(c, "rows.jsonl", rows, "numbers as prompts accepted")


@build("dataset-csv")
def _(c: Ctx) -> Plan:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ["prompt", "privileged_context"])
    writer.writeheader()
    writer.writerows(_facts())
    c.write("rows.csv", buffer.getvalue())
    return Plan(c.sdft(dataset="rows.csv"), check=model_saved(c.path("out")), note="trained")


# ================================================================================================== continual
def _continual_case(c: Ctx, *extra, tasks="facts") -> Plan:
    return Plan(c.continual(*extra, tasks=tasks), check=accepted("the comparison ran"))


@build("continual-grid-python-object-tag")
def _(c: Ctx) -> Plan:
    marker = c.path("PWNED")
    c.write("grid.yaml", f"- {pwn_tag(marker)}\n")
    plan = _continual_case(c, "--grid", "grid.yaml")
    plan.always = no_code_ran(marker)
    return plan


# =================================================================================================== security
@build("vllm-serve-default-host")
def _(c: Ctx) -> Plan:
    code = (
        "import json, sys; from trl_sdft.cli import vllm_serve_command; "
        "command, _ = vllm_serve_command(['--model', sys.argv[1]], cuda=False); print(json.dumps(command))"
    )

    def check(result: Result) -> str | None:
        command = json.loads(result.stdout.strip().splitlines()[-1])
        host = command[command.index("--host") + 1] if "--host" in command else "(vLLM's default)"
        return None if host == "127.0.0.1" else f"vllm-serve binds {host} by default (reachable from the network)"

    return Plan([PYTHON, "-c", code, str(c.assets.model())], check=check, note="binds 127.0.0.1")


@build("vllm-serve-help")
def _(c: Ctx) -> Plan:
    def check(result: Result) -> str | None:
        text = " ".join(result.stdout.split())
        if "--host" not in text:
            return "no --host in the help"
        return None if "127.0.0.1" in text else "the help does not say the server binds 127.0.0.1 by default"

    return Plan([PYTHON, SDFT, "vllm-serve", "--help"], check=check, note="help printed, no server")


# ================================================================================================ round two
# Cases aimed at what the first round added (the output-dir rule and its lock, --overwrite_output_dir, resume, chat
# templates, tools, encodings): the second hardening round (issue 30).
TOOL_MODULE = '''
def lookup(name: str) -> str:
    """Look up a name.

    Args:
        name: The name.
    """
    return name.upper()
'''


def _peak_rss(argv: list[str]) -> list[str]:
    """`argv` (a Python script) run so that its peak RSS (KiB) is printed to stderr at exit."""
    code = (
        "import atexit, resource, runpy, sys; atexit.register(lambda: print('peak_rss_kib', "
        "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)); sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    return [PYTHON, "-c", code, *argv[1:]]


@build("sdft-resume-from-other-dir-overwrite")
def _(c: Ctx) -> Plan:
    c.run_copy(name="first")
    out = c.run_copy(name="out")

    def check(result: Result) -> str | None:
        if (out / "checkpoint-1").exists():
            return "the replaced run's checkpoints were kept"
        return weights_problem(out)

    argv = c.sdft("--overwrite_output_dir", resume_from_checkpoint="first/checkpoint-1")
    return Plan(argv, check=check, allowed=("out/**",), note="resumed elsewhere, old run replaced on request")


@build("sdft-overwrite-symlinked-checkpoint")
def _(c: Ctx) -> Plan:
    out = c.run_copy()
    shutil.move(str(out / "checkpoint-1"), str(c.path("kept-checkpoint")))
    (out / "checkpoint-1").symlink_to("../kept-checkpoint")

    def check(result: Result) -> str | None:
        if not (c.path("kept-checkpoint") / "trainer_state.json").is_file():
            return "the symlinked checkpoint's target was deleted"
        return "the symlink is still there" if (out / "checkpoint-1").is_symlink() else weights_problem(out)

    argv = c.sdft("--overwrite_output_dir")
    return Plan(argv, check=check, allowed=("out/**",), note="the link removed, its target kept")


@build("sdft-tools-duplicate-name")
def _(c: Ctx) -> Plan:
    c.write("tools_a.py", TOOL_MODULE)
    c.write("tools_b.py", TOOL_MODULE.replace("name.upper()", "name.lower()"))
    argv = c.sdft(
        "--tools", "tools_a:lookup", "tools_b:lookup", dataset=c.chat_facts(), chat_template_path="smollm2-tools"
    )
    return Plan(argv, check=accepted("two tools named `lookup`: every call goes to the last"), names=("lookup",))


@build("sdft-huge-privileged-context")
def _(c: Ctx) -> Plan:
    from trl_sdft.testing import facts_rows

    rows = facts_rows()
    for row in rows[:2]:
        row["privileged_context"] = ("The sky is green on Tuesdays. " * 1_700_000)[:50_000_000] + row[
            "privileged_context"
        ]
    c.jsonl("big.jsonl", rows)
    limit_kib = 3 * 1024 * 1024

    def check(result: Result) -> str | None:
        peak = [int(line.split()[1]) for line in result.stderr.splitlines() if line.startswith("peak_rss_kib")]
        if not peak:
            return "no peak RSS printed"
        if peak[-1] > limit_kib:
            return f"peak RSS {peak[-1] / 1024**2:.1f} GiB for a 50 MB context (over {limit_kib / 1024**2:.0f} GiB)"
        return weights_problem(c.path("out"))

    return Plan(_peak_rss(c.sdft(dataset="big.jsonl")), check=check, note="cut before tokenizing, peak under 3 GiB")
