"""The continual-learning harness: task files and scorers, retention metrics and reports, sequential runs."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from trl_sdft.cli.continual import config_from_args, parser
from trl_sdft.continual import (
    BUNDLED_TASKS,
    ContinualConfig,
    TaskError,
    load_task,
    load_tasks,
    markdown_table,
    retention_metrics,
    run_continual,
    summarize,
    task_from_rows,
)
from trl_sdft.continual.harness import _split_saved

ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def header(**settings):
    return {"task": {"name": "t", "scorer": "contains", "answers": ["red"], **settings}}


TRAIN = {
    "split": "train",
    "prompt": "What color is Zorbo?",
    "privileged_context": "Zorbo is red.",
    "demonstration": "Zorbo is red.",
}


# ---------------------------------------------------------------- tasks and scorers


def test_header_defaults_and_row_overrides(tmp_path):
    path = write_jsonl(
        tmp_path / "colors.jsonl",
        [
            header(teacher_prompt_template="{prompt} / {privileged_context}", max_new_tokens=7),
            TRAIN,
            {"split": "test", "prompt": "Zorbo?", "privileged_context": "Zorbo is red."},
            {"split": "test", "prompt": "Quilla?", "scorer": "exact", "answers": ["Quilla is blue."]},
            {"split": "test", "prompt": "Tovi?", "scorer": "regex", "pattern": "^\\s*ANSWER: \\w+"},
        ],
    )
    task = load_task(path)
    assert task.name == "t" and task.max_new_tokens == 7 and len(task.train) == 1 and len(task.test) == 3
    assert task.score(["It is red.", " Quilla is blue. ", "  ANSWER: green"]) == [True, True, True]
    assert task.score(["It is reddish.", "Quilla is blue, I think.", "The ANSWER: green"]) == [False, False, False]
    assert task.test_prompts(with_context=False)[0] == [{"role": "user", "content": "Zorbo?"}]
    assert not task.has_test_context
    assert task.head(None, 1).test_prompts(with_context=True) == [
        [{"role": "user", "content": "Zorbo? / Zorbo is red."}]
    ]


def test_python_scorer_from_a_file(tmp_path):
    (tmp_path / "scoring.py").write_text("def short(answer, row):\n    return len(answer) <= row['limit']\n")
    rows = [
        header(scorer="python", function=f"{tmp_path / 'scoring.py'}:short"),
        TRAIN,
        {"split": "test", "prompt": "Say hi.", "limit": 3},
    ]
    task = load_task(write_jsonl(tmp_path / "short.jsonl", rows))
    assert task.score(["hi"]) == [True]
    assert task.score(["hello there"]) == [False]


def test_name_defaults_to_the_file_name(tmp_path):
    rows = [TRAIN, {"split": "test", "prompt": "Zorbo?", "scorer": "contains", "answers": "red"}]
    assert load_task(write_jsonl(tmp_path / "my_task.jsonl", rows)).name == "my_task"


def test_datasets_for_sdft_and_sft():
    task = task_from_rows([header(), TRAIN, {"split": "test", "prompt": "Zorbo?"}], "t")
    sdft = task.sdft_dataset()[0]
    assert sdft == {
        "prompt": [{"role": "user", "content": "What color is Zorbo?"}],
        "privileged_context": "Zorbo is red.",
    }
    sft = task.sft_dataset()[0]
    assert sft["prompt"] == sdft["prompt"]
    assert sft["completion"] == [{"role": "assistant", "content": "Zorbo is red."}]


@pytest.mark.parametrize(
    "records, message",
    [
        ([TRAIN, {"split": "dev", "prompt": "x"}], "line 2: `split` must be 'train' or 'test'"),
        ([{**TRAIN, "privileged_context": ""}, {"split": "test", "prompt": "x"}], "line 1: `privileged_context` is"),
        ([{k: v for k, v in TRAIN.items() if k != "demonstration"}], "`demonstration` is missing"),
        ([TRAIN, {"split": "test", "prompt": "x", "scorer": "fuzzy"}], "unknown scorer 'fuzzy'"),
        ([TRAIN, {"split": "test", "prompt": "x", "scorer": "regex", "pattern": "("}], "not a valid regular expr"),
        ([TRAIN, {"split": "test", "prompt": "x", "scorer": "exact", "answers": []}], "needs `answers`"),
        ([TRAIN, {"split": "test", "prompt": "x", "scorer": "python", "function": "nope_mod:f"}], "cannot load"),
        ([TRAIN, {"split": "test", "prompt": "", "scorer": "contains", "answers": ["a"]}], "`prompt` must be"),
        ([TRAIN], "has no test rows"),
        ([{"split": "test", "prompt": "x", "scorer": "contains", "answers": ["a"]}], "has no train rows"),
        ([{"task": {"name": "t", "scorrer": "exact"}}, TRAIN], "unknown task settings ['scorrer']"),
        (
            [
                {"task": {"name": "t", "teacher_prompt_template": "{prompt}"}},
                TRAIN,
                {"split": "test", "prompt": "x", "scorer": "contains", "answers": ["a"]},
            ],
            "lacks {privileged_context}",
        ),
    ],
)
def test_bad_task_files_name_the_line_and_the_fix(tmp_path, records, message):
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(TaskError) as error:
        load_task(path)
    assert message in str(error.value)
    assert "bad.jsonl" in str(error.value)


def test_invalid_json_and_unknown_tasks(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(TRAIN) + "\n{not json\n")
    with pytest.raises(TaskError, match="broken.jsonl, line 2: not valid JSON"):
        load_task(str(path))
    with pytest.raises(TaskError, match="neither a bundled task"):
        load_task("no_such_task")


def test_two_tasks_with_one_name_are_refused(tmp_path):
    rows = [header(), TRAIN, {"split": "test", "prompt": "Zorbo?"}]
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    b = write_jsonl(tmp_path / "b.jsonl", rows)
    with pytest.raises(TaskError, match="'t' is used twice"):
        load_tasks([a, b])


def test_bundled_tasks_load_with_scorers_and_teacher_contexts():
    tasks = load_tasks(list(BUNDLED_TASKS))
    assert [t.name for t in tasks] == list(BUNDLED_TASKS)
    for task in tasks:
        assert len(task.train) >= 8 and len(task.test) >= 8 and task.has_test_context
        # the demonstrations pass their own task's scorer where the test row is a training prompt's twin
        assert all(row["demonstration"].strip() for row in task.train)
    tool = next(t for t in tasks if t.name == "tool_call")
    call = tool.test[0]["privileged_context"]
    assert tool.score([call + "\nDone."] + [""] * (len(tool.test) - 1))[0]
    assert not tool.score(["Sure: " + call] + [""] * (len(tool.test) - 1))[0]


# ---------------------------------------------------------------- metrics and reports


def test_retention_metrics_follow_their_definitions():
    # columns: task a, task b, task c, probes; rows: base, after a, after b, after c
    matrix = [
        [0.0, 0.1, 0.0, 1.0],
        [0.9, 0.1, 0.0, 0.9],
        [0.6, 0.8, 0.0, 0.8],
        [0.3, 0.5, 0.7, 0.6],
    ]
    metrics = retention_metrics(matrix, 3)
    assert metrics["learned"] == pytest.approx((0.9 + 0.8 + 0.7) / 3)
    assert metrics["final"] == pytest.approx((0.3 + 0.5 + 0.7) / 3)
    assert metrics["forgetting"] == pytest.approx(((0.9 - 0.3) + (0.8 - 0.5)) / 2)
    assert metrics["probes_base"] == 1.0 and metrics["probes_final"] == 0.6
    assert metrics["probes_drop"] == pytest.approx(0.4)
    assert metrics["base"] == pytest.approx(0.1 / 3)
    assert retention_metrics(matrix[:2], 1)["forgetting"] is None


def _fake_results(seeds=(1, 2)):
    def stage(number, a, probes):
        return {"stage": number, "scores": {"a": {"accuracy": a}, "probes": {"accuracy": probes}}}

    runs = []
    for seed in seeds:
        runs.append(
            {
                "label": "SFT lr=0.001",
                "method": "sft",
                "alpha": None,
                "learning_rate": 1e-3,
                "seed": seed,
                "stages": [stage(0, 0.0, 1.0), stage(1, 0.5 + 0.25 * (seed == 2), 0.5)],
            }
        )
    runs.append(
        {
            "label": "SDFT a=0 lr=0.001",
            "method": "sdft",
            "alpha": 0.0,
            "learning_rate": 1e-3,
            "seed": 1,
            "stages": [stage(0, 0.0, 1.0), stage(1, 0.25, 1.0)],
        }
    )
    config = {"model": "m", "steps": 3, "batch_size": 2, "learning_rates": [1e-3], "seeds": list(seeds)}
    return {"config": config, "tasks": [{"name": "a"}, {"name": "probes"}], "runs": runs}


def test_summary_averages_seeds_per_label_and_the_table_has_a_row_per_stage():
    results = _fake_results()
    summary = summarize(results)
    assert [s["label"] for s in summary] == ["SFT lr=0.001", "SDFT a=0 lr=0.001"]
    assert summary[0]["matrix"] == [[0.0, 1.0], [0.625, 0.5]]
    assert summary[0]["seeds"] == [1, 2]
    table = markdown_table(results)
    assert "| SFT lr=0.001 | 62% | 62% | – | 100% → 50% |" in table
    assert "## SFT lr=0.001 (mean of seeds [1, 2])" in table
    sdft_rows = table.split("## SDFT a=0 lr=0.001 (seed 1)")[1].strip().splitlines()
    assert sdft_rows[:4] == [
        "| after stage | a | probes |",
        "|---|---|---|",
        "| 0: base | 0% | 100% |",
        "| 1: a | 25% | 100% |",
    ]


def png_size(path) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


# ---------------------------------------------------------------- runs on a tiny model


@pytest.fixture
def tiny_tasks(tmp_path):
    """Two one-fact tasks (two rows each) the tiny tokenizer knows; the test rows are the training prompts, exact."""
    paths = []
    for name, people in (("first", [("Zorbo", "red")] * 2), ("second", [("Tovi", "green")] * 2)):
        rows = [{"task": {"name": name, "scorer": "exact", "max_new_tokens": 6}}]
        for person, color in people:
            answer = f"{person} is {color}."
            rows.append(
                {
                    "split": "train",
                    "prompt": f"What color is {person}?",
                    "privileged_context": answer,
                    "demonstration": answer,
                }
            )
            rows.append(
                {
                    "split": "test",
                    "prompt": f"What color is {person}?",
                    "answers": [answer],
                    "privileged_context": answer,
                }
            )
        paths.append(write_jsonl(tmp_path / f"{name}.jsonl", rows))
    return paths


@pytest.mark.slow  # over 2 s alone on 2 cores: not in `make test-fast`
def test_sequential_runs_write_retention_files(tmp_path, tiny_model_dir, tiny_tasks):
    out = tmp_path / "out"
    config = ContinualConfig(
        tasks=tiny_tasks,
        model=tiny_model_dir,
        steps=30,
        learning_rates=[1e-2],
        alphas=[0.0, 1.0],
        seeds=[3],
        batch_size=2,
        num_generations=1,
        num_probes=3,
        output_dir=str(out),
    )
    logs = []
    results = run_continual(config, log=logs.append)
    assert [(r["method"], r["alpha"]) for r in results["runs"]] == [("sft", None), ("sdft", 0.0), ("sdft", 1.0)]
    saved = json.loads((out / "retention.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(results["runs"]))
    for run in saved["runs"]:
        assert [s["trained"] for s in run["stages"]] == [None, "first", "second"]
        assert run["stages"][0]["scores"] == saved["base"]
        for stage in run["stages"][1:]:
            assert set(stage["scores"]) == {"first", "second", "probes"}
            assert stage["scores"]["probes"]["total"] == 3
            assert "answers" not in stage["scores"]["first"]  # the answers have their own file
            assert stage["train_loss"] == stage["train_loss"]  # not NaN
    assert set(saved["teacher_check"]) == {"first", "second"} and "teacher_answers" not in saved
    answers = json.loads((out / "answers.json").read_text())
    assert set(answers["base"]) == {"first", "second", "probes"} and set(answers["teacher"]) == {"first", "second"}
    assert [(r["method"], r["alpha"]) for r in answers["runs"]] == [("sft", None), ("sdft", 0.0), ("sdft", 1.0)]
    for run in answers["runs"]:
        assert [s["trained"] for s in run["stages"]] == ["first", "second"]
        assert [len(s["answers"]["probes"]) for s in run["stages"]] == [3, 3]
    # SFT memorizes its exact answers: training reaches the evaluation (the random base model scores 0)
    sft = saved["runs"][0]["stages"]
    assert saved["base"]["first"]["accuracy"] == 0.0
    assert sft[1]["scores"]["first"]["accuracy"] == 1.0, answers["runs"][0]["stages"][0]["answers"]["first"]
    assert sft[2]["scores"]["second"]["accuracy"] == 1.0
    summary = {s["label"]: s for s in saved["summary"]}
    assert set(summary) == {"SFT lr=0.01", "SDFT a=0 lr=0.01", "SDFT a=1 lr=0.01"}
    assert summary["SFT lr=0.01"]["learned"] == 1.0
    table = (out / "retention.md").read_text()
    for label in summary:
        assert f"## {label} (seed 3)" in table
    assert table.count("| 2: second |") == 3
    width, height = png_size(out / "retention.png")
    assert width > 2 * height > 0  # one panel per task plus the probes, side by side
    assert any("teacher check" in line for line in logs)

    # a second call neither trains nor overwrites without being asked to
    before = (out / "retention.json").read_text()
    answers_before = (out / "answers.json").read_text()
    with pytest.raises(FileExistsError, match="--resume"):
        run_continual(config)
    logs.clear()
    resumed = run_continual(config, resume=True, log=logs.append)
    assert sum("done before, kept" in line for line in logs) == 3
    assert json.loads((out / "retention.json").read_text())["runs"] == json.loads(before)["runs"]
    assert resumed["runs"] == json.loads(before)["runs"]
    assert json.loads((out / "answers.json").read_text()) == json.loads(answers_before)  # the kept runs' answers
    changed = ContinualConfig(**{**config.__dict__, "steps": 5})
    with pytest.raises(ValueError, match="steps"):
        run_continual(changed, resume=True)
    assert (out / "retention.json").read_text() == before


def test_cli_flags_and_quick_defaults():
    args = parser().parse_args(["--method", "sdft", "--tasks", "facts,identity", "--alphas", "0,1", "--quick"])
    config = config_from_args(args)
    assert config.methods == ["sdft"] and config.tasks == ["facts", "identity"] and config.alphas == [0.0, 1.0]
    assert (config.steps, config.max_train_rows, config.max_test_rows, config.num_probes) == (2, 4, 4, 8)
    explicit = config_from_args(parser().parse_args(["--quick", "--steps", "5", "--method", "both"]))
    assert explicit.steps == 5 and explicit.methods == ["sft", "sdft"]
    with pytest.raises(SystemExit):
        parser().parse_args(["--learning_rates", "fast"])
    with pytest.raises(ValueError, match="distillation_alpha|alphas"):
        ContinualConfig(alphas=[2.0])


@pytest.mark.processes
def test_cli_bad_task_fails_before_training_and_keeps_existing_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "retention.json").write_text("{}")
    script = str(ROOT / "scripts" / "continual.py")
    bad = subprocess.run(
        [sys.executable, script, "--tasks", "facts,missing.jsonl", "--output_dir", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2
    assert "missing.jsonl" in bad.stderr and "neither a bundled task" in bad.stderr
    exists = subprocess.run(
        [sys.executable, script, "--tasks", "facts", "--output_dir", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert exists.returncode == 2 and "--resume" in exists.stderr
    assert (out / "retention.json").read_text() == "{}"


@pytest.mark.usefixtures("requires_smollm")
@pytest.mark.slow
@pytest.mark.processes
def test_quick_run_on_the_default_model(tmp_path):
    """The README's `--quick` command on SmolLM2: every method, every bundled task, the files and their shapes."""
    out = tmp_path / "quick"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "continual.py"), "--quick", "--output_dir", str(out)],
        capture_output=True,
        text=True,
        timeout=3600,  # a hang guard only: a loaded machine must not fail this run
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((out / "retention.json").read_text())
    names = list(BUNDLED_TASKS)
    assert [t["name"] for t in saved["tasks"]] == [*names, "probes"]
    assert [r["label"] for r in saved["runs"]] == [
        "SFT lr=0.0001",
        "SDFT a=0 lr=0.0001",
        "SDFT a=0.5 lr=0.0001",
        "SDFT a=1 lr=0.0001",
    ]
    for run in saved["runs"]:
        assert len(run["stages"]) == len(names) + 1
        for stage in run["stages"]:
            assert [stage["scores"][n]["total"] for n in [*names, "probes"]] == [4, 4, 4, 8]
    assert saved["base"]["probes"]["accuracy"] == 1.0
    assert all(check["teacher"] is not None for check in saved["teacher_check"].values())
    table = (out / "retention.md").read_text()
    assert table.count("| 0: base |") == 4 and table.count(f"| 3: {names[-1]} |") == 4
    width, height = png_size(out / "retention.png")
    assert width > 2 * height > 0
    assert "retention table:" in result.stdout


def test_two_runs_cannot_share_an_output_dir_and_a_file_is_not_one(tmp_path, capsys):
    """The rule every CLI follows: one run per output directory at a time; a file is no output directory."""
    from trl_sdft.cli.continual import main
    from trl_sdft.cli.output_dir import OutputDirLock

    out = tmp_path / "out"
    out.mkdir()
    held = OutputDirLock(str(out))
    try:
        assert main(["--tasks", "facts", "--output_dir", str(out)]) == 2
        assert "in use by another run" in capsys.readouterr().err
    finally:
        held.release()
    (tmp_path / "file").write_text("mine")
    assert main(["--tasks", "facts", "--output_dir", str(tmp_path / "file")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine"


def test_resume_moves_answers_out_of_an_older_retention_file():
    """A retention.json written when it held every answer: resuming splits it as the runner writes it now."""
    scores = {"t": {"accuracy": 0.5, "correct": 1, "total": 2, "answers": [{"prompt": "p", "answer": "a"}] * 2}}
    old = {
        "base": json.loads(json.dumps(scores)),
        "teacher_answers": json.loads(json.dumps(scores)),
        "runs": [
            {
                "method": "sft",
                "learning_rate": 0.1,
                "seed": 1,
                "label": "SFT lr=0.1",
                "stages": [
                    {"stage": 0, "trained": None, "scores": json.loads(json.dumps(scores))},
                    {"stage": 1, "trained": "t", "scores": json.loads(json.dumps(scores))},
                ],
            }
        ],
    }
    results, answers = _split_saved(old)
    assert "teacher_answers" not in results and "answers" not in results["base"]["t"]
    assert all("answers" not in stage["scores"]["t"] for stage in results["runs"][0]["stages"])
    assert results["base"]["t"] == {"accuracy": 0.5, "correct": 1, "total": 2}
    assert answers["base"]["t"] == answers["teacher"]["t"] == scores["t"]["answers"]
    assert answers["runs"][0]["label"] == "SFT lr=0.1"
    assert answers["runs"][0]["stages"] == [{"stage": 1, "trained": "t", "answers": {"t": scores["t"]["answers"]}}]
