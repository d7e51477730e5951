"""Budget grids for the continual harness: grid files, SDFT variants, the Pareto table and plot, a grid run."""

import json
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from trl_sdft.continual import ContinualConfig, run_continual, summarize
from trl_sdft.continual.grid import PAPER_RECIPE, VARIANTS, GridError, Point, load_grid
from trl_sdft.continual.harness import RunSpec, run_specs, sdft_settings
from trl_sdft.continual.report import pareto_front, pareto_table, retention_metrics, write_reports
from trl_sdft.continual.tasks import load_tasks

ROOT = Path(__file__).resolve().parents[1]


def write_yaml(path: Path, points) -> str:
    path.write_text(yaml.safe_dump(points))
    return str(path)


def test_the_shipped_grid_loads_and_covers_what_the_comparison_needs():
    points = load_grid(str(ROOT / "configs" / "continual_pareto.yaml"))
    sft = [p for p in points if p.method == "sft"]
    sdft = [p for p in points if p.method == "sdft"]
    assert len({(p.learning_rate, p.steps) for p in sft}) >= 4  # SFT budgets down to small ones
    assert {p.variant for p in sdft} == set(VARIANTS)  # every variant at least once
    assert {p.alpha for p in sdft} >= {0.0, 0.5}
    assert max(p.steps for p in sdft) > max(p.steps for p in sft)  # SDFT at more steps


def test_grid_files_yaml_and_jsonl(tmp_path):
    yaml_points = [
        {"method": "sft", "learning_rate": 1e-5, "steps": 5},
        {"method": "sdft", "variant": "paper", "learning_rate": 5e-5},
        {"method": "sdft", "learning_rate": 1e-4, "alpha": 0.5, "steps": 30},
    ]
    points = load_grid(write_yaml(tmp_path / "g.yaml", yaml_points))
    assert points == [
        Point("sft", 1e-5, 5),
        Point("sdft", 5e-5, None, "paper", 0.0),  # the variant's alpha
        Point("sdft", 1e-4, 30, None, 0.5),
    ]
    jsonl = tmp_path / "g.jsonl"
    jsonl.write_text("\n".join(json.dumps(p) for p in yaml_points) + "\n\n")
    assert load_grid(str(jsonl)) == points


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"method": "rl", "learning_rate": 1e-5}, "`method` must be 'sft' or 'sdft'"),
        ({"method": "sft", "learning_rate": -1}, "`learning_rate` must be a positive number"),
        ({"method": "sft", "learning_rate": 1e-5, "steps": 0}, "`steps` must be an integer >= 1"),
        ({"method": "sft", "learning_rate": 1e-5, "variant": "paper"}, "drop them from this SFT point"),
        ({"method": "sdft", "learning_rate": 1e-5, "variant": "best"}, "unknown SDFT variant 'best'"),
        ({"method": "sdft", "learning_rate": 1e-5, "alpha": 2}, "`alpha` must lie in"),
        ({"method": "sdft", "learning_rate": 1e-5, "lr": 2}, "unknown key"),
        ("sft", "a point is a mapping"),
    ],
)
def test_bad_grid_points_name_the_file_and_the_point(tmp_path, entry, message):
    path = write_yaml(tmp_path / "g.yaml", [{"method": "sft", "learning_rate": 1e-5}, entry])
    with pytest.raises(GridError, match=message) as err:
        load_grid(path)
    assert f"{path}, point 2" in str(err.value)


def test_bad_grid_files(tmp_path):
    with pytest.raises(GridError, match="does not exist"):
        load_grid(str(tmp_path / "missing.yaml"))
    with pytest.raises(GridError, match="YAML list"):
        load_grid(write_yaml(tmp_path / "a.yaml", {"method": "sft"}))
    with pytest.raises(GridError, match="no points"):
        load_grid(write_yaml(tmp_path / "b.yaml", []))
    twice = [{"method": "sft", "learning_rate": 1e-5}] * 2
    with pytest.raises(GridError, match="point 2: the same point appears twice"):
        load_grid(write_yaml(tmp_path / "c.yaml", twice))
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"method": "sft", "learning_rate": 1e-5}\n{oops\n')
    with pytest.raises(GridError, match="line 2: not valid JSON"):
        load_grid(str(bad))
    tagged = tmp_path / "e.yaml"
    tagged.write_text('- method: sft\n  learning_rate: !!python/object/apply:os.system ["echo pwned"]\n')
    with pytest.raises(
        GridError, match="e.yaml, line 2: the tag !!python/object/apply:os.system is not allowed"
    ) as err:
        load_grid(str(tagged))
    assert "\n" not in str(err.value)  # one line, not PyYAML's location and caret


def test_paper_variant_is_configs_paper_yaml():
    """The harness's `paper` variant and `configs/paper.yaml` say the same for every setting the variant fixes."""
    paper = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    assert {key: paper[key] for key in PAPER_RECIPE} == PAPER_RECIPE


def test_run_specs_from_a_grid_and_their_labels():
    points = [Point("sft", 1e-5, 5), Point("sdft", 5e-5, 30, "paper", 0.0), Point("sdft", 1e-4, None, None, 0.5)]
    config = ContinualConfig(seeds=[1, 2])
    specs = run_specs(config, points)
    # seed by seed: a grid cut short has every point at its first seeds
    assert [(s.method, s.seed) for s in specs] == [("sft", 1), ("sdft", 1), ("sdft", 1)] + [
        ("sft", 2),
        ("sdft", 2),
        ("sdft", 2),
    ]
    assert [s.label for s in specs[:3]] == [
        "SFT lr=1e-05 5 steps",
        "SDFT paper a=0 lr=5e-05 30 steps",
        "SDFT a=0.5 lr=0.0001",
    ]
    assert len({s.key for s in specs}) == 6
    only_sdft = run_specs(ContinualConfig(seeds=[1], methods=["sdft"]), points)
    assert [s.method for s in only_sdft] == ["sdft", "sdft"]
    # without a grid: methods x learning rates x alphas x seeds, labels as before
    plain = run_specs(ContinualConfig(learning_rates=[1e-4], alphas=[0.0], seeds=[7]))
    assert [s.label for s in plain] == ["SFT lr=0.0001", "SDFT a=0 lr=0.0001"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_takes_effect_in_the_sdft_config(tmp_path, variant):
    from trl_sdft import SDFTConfig
    from trl_sdft.continual.harness import _common_args

    task = load_tasks(["facts"])[0]
    config = ContinualConfig()
    spec = RunSpec("sdft", 5e-5, 42, VARIANTS[variant].get("distillation_alpha", 0.0), 30, variant)
    args = SDFTConfig(**sdft_settings(config, spec, task, _common_args(config, spec, str(tmp_path))))
    assert args.max_steps == 30 and args.learning_rate == 5e-5
    want = {
        "distillation_mode": "full_logits",
        "teacher_model_kind": "base",
        "teacher_prompt_template": task.teacher_prompt_template,
        "generate_from_teacher": False,
        "lr_scheduler_type": "constant",
        **VARIANTS[variant],
    }
    for key, value in want.items():
        got = getattr(args, key)
        assert (got.value if hasattr(got, "value") else got) == value, key


# ---------------------------------------------------------------- the Pareto report


def test_pareto_front_keeps_the_points_nothing_beats():
    points = [(0.2, 0.9), (0.5, 0.5), (0.4, 0.4), (0.9, 0.1), (0.5, 0.6)]
    assert pareto_front(points) == [0, 4, 3]
    assert pareto_front([(0.5, 0.5), (0.5, 0.5)]) == [0, 1]  # ties dominate nothing


def _run(label, method, seed, learned_second, kept_first, probes):
    def stage(number, first, second, probe):
        return {
            "stage": number,
            "scores": {n: {"accuracy": v} for n, v in (("a", first), ("b", second), ("probes", probe))},
        }

    return {
        "label": label,
        "method": method,
        "alpha": None if method == "sft" else 0.0,
        "learning_rate": 1e-4,
        "steps": 5,
        "variant": None,
        "seed": seed,
        "stages": [stage(0, 0.0, 0.0, 1.0), stage(1, 1.0, 0.0, 0.8), stage(2, kept_first, learned_second, probes)],
    }


def test_spread_over_seeds_and_the_pareto_table(tmp_path):
    results = {
        "config": {"model": "m", "steps": 5, "batch_size": 2, "learning_rates": [1e-4], "seeds": [1, 2]},
        "tasks": [{"name": "a"}, {"name": "b"}, {"name": "probes"}],
        "runs": [
            _run("SFT", "sft", 1, 1.0, 0.0, 0.2),
            _run("SFT", "sft", 2, 1.0, 0.2, 0.4),
            _run("SDFT", "sdft", 1, 0.5, 1.0, 0.9),
            _run("SDFT", "sdft", 2, 0.5, 0.8, 0.9),
        ],
    }
    summary = {entry["label"]: entry for entry in summarize(results)}
    sft = summary["SFT"]
    assert sft["earlier_final"] == pytest.approx(0.1) and sft["spread"]["earlier_final"] == pytest.approx(0.1)
    assert sft["probes_final"] == pytest.approx(0.3) and sft["spread"]["probes_final"] == pytest.approx(0.1)
    assert sft["learned"] == pytest.approx(1.0) and sft["spread"]["learned"] == 0
    assert summary["SDFT"]["earlier_final"] == pytest.approx(0.9)
    assert retention_metrics([[0, 1], [1, 0.5]], 1)["earlier_final"] is None  # one task: nothing earlier
    table = pareto_table(results)
    assert "| SFT | SFT | 2 | 100% ± 0% | 10% ± 10% | 30% ± 10% | +90 pts | yes / yes |" in table
    assert "| SDFT | SDFT | 2 | 75% ± 0% | 90% ± 10% | 90% ± 0% |" in table
    write_reports({**results, "summary": summarize(results)}, str(tmp_path))
    data = (tmp_path / "pareto.png").read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and width > height > 0
    assert "| SDFT | SDFT |" in (tmp_path / "pareto.md").read_text()


# ---------------------------------------------------------------- a grid run on a tiny model


@pytest.mark.slow  # over 2 s alone on 2 cores: not in `make test-fast`
def test_a_grid_run_on_the_tiny_model_resumes_by_point(tmp_path, tiny_model_dir):
    task = tmp_path / "t.jsonl"
    rows = [{"task": {"name": "t", "scorer": "exact", "max_new_tokens": 4}}]
    for split in ("train", "train", "test"):
        row = {"split": split, "prompt": "What color is Zorbo?", "privileged_context": "Zorbo is red."}
        row.update({"demonstration": "Zorbo is red."} if split == "train" else {"answers": ["Zorbo is red."]})
        rows.append(row)
    task.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    grid = write_yaml(
        tmp_path / "grid.yaml",
        [
            {"method": "sft", "learning_rate": 1e-3, "steps": 1},
            {"method": "sdft", "variant": "paper", "learning_rate": 1e-3, "steps": 2},
        ],
    )
    config = ContinualConfig(
        tasks=[str(task)],
        model=tiny_model_dir,
        seeds=[1, 2],
        batch_size=2,
        num_probes=2,
        output_dir=str(tmp_path / "out"),
        grid=grid,
    )
    results = run_continual(config, log=lambda line: None)
    assert [(r["label"], r["seed"]) for r in results["runs"]] == [
        ("SFT lr=0.001 1 steps", 1),
        ("SDFT paper a=0 lr=0.001 2 steps", 1),
        ("SFT lr=0.001 1 steps", 2),
        ("SDFT paper a=0 lr=0.001 2 steps", 2),
    ]
    assert (tmp_path / "out" / "pareto.png").exists() and (tmp_path / "out" / "pareto.md").exists()
    logs = []
    run_continual(config, resume=True, log=logs.append)
    assert sum("done before, kept" in line for line in logs) == 4
    # a grid with a point more, in another file, and a seed more: only the new runs run
    grown = write_yaml(
        tmp_path / "grown.yaml",
        [
            {"method": "sft", "learning_rate": 1e-3, "steps": 1},
            {"method": "sdft", "variant": "paper", "learning_rate": 1e-3, "steps": 2},
            {"method": "sft", "learning_rate": 1e-4, "steps": 1},
        ],
    )
    logs = []
    grown_config = replace(config, grid=grown, seeds=[1, 2, 3])
    results = run_continual(grown_config, resume=True, log=logs.append)
    assert sum("done before, kept" in line for line in logs) == 4
    assert len(results["runs"]) == 9 and any("extended" in line for line in logs)
    # a changed grid is not resumed into the same file
    write_yaml(tmp_path / "grid.yaml", [{"method": "sft", "learning_rate": 1e-3, "steps": 2}])
    with pytest.raises(ValueError, match="grid_points"):
        run_continual(config, resume=True)
