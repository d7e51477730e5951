"""Distillation on stored top-K logits: the loss against a direct computation, training end to end, the errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trl_sdft.cli.offline import extract_parser, run_distillation, run_extraction
from trl_sdft.offline.kd import sft_kd_loss, teacher_agreement, topk_kl
from trl_sdft.testing import COLORS, NAMES, build_model, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_topk_kl_equals_a_direct_computation():
    torch.manual_seed(0)
    student = torch.randn(3, 11)
    indices = torch.stack([torch.randperm(11)[:4] for _ in range(3)])
    values = torch.randn(3, 4)
    expected = []
    for row in range(3):
        p = torch.exp(values[row]) / torch.exp(values[row]).sum()
        log_q_full = student[row] - torch.log(torch.exp(student[row]).sum())
        expected.append(sum(p[j] * (torch.log(p[j]) - log_q_full[indices[row, j]]) for j in range(4)))
    torch.testing.assert_close(topk_kl(student, indices, values), torch.stack(expected))
    # the teacher's top-K covering the whole vocabulary makes it the ordinary KL
    full = torch.arange(11).expand(3, 11)
    teacher = torch.randn(3, 11)
    reference = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="none")
    torch.testing.assert_close(topk_kl(student, full, teacher), reference.sum(-1))


def test_sft_kd_loss_parts_and_reductions():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 6, -100, -100]])
    kd_mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    indices = torch.randint(0, 7, (2, 5, 3))
    values = torch.randn(2, 5, 3)
    loss, parts = sft_kd_loss(logits, labels, indices, values, kd_mask, loss_multi=0.5, per_token=True)
    # SFT: the logits at t-1 predict label t
    ce = [
        F.cross_entropy(logits[b, t - 1 : t], labels[b, t : t + 1])
        for b in range(2)
        for t in range(5)
        if labels[b, t] >= 0
    ]
    torch.testing.assert_close(parts["sft_loss"], torch.stack(ce).mean())
    kl = topk_kl(logits, indices, values)
    torch.testing.assert_close(parts["kd_loss"], kl[kd_mask].mean())
    torch.testing.assert_close(loss, parts["sft_loss"] + 0.5 * parts["kd_loss"])
    _, per_sequence = sft_kd_loss(logits, labels, indices, values, kd_mask, per_token=False)
    torch.testing.assert_close(per_sequence["kd_loss"], (kl[0, 1:4].mean() + kl[1, :2].mean()) / 2)
    # adaptive: each position's KL weighted by the teacher's probability of the hard target
    _, adaptive = sft_kd_loss(logits, labels, indices, values, kd_mask, adaptive=True)
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1).clamp(min=0)
    weights = teacher_agreement(indices, values, targets)
    torch.testing.assert_close(adaptive["kd_loss"], (kl * weights)[kd_mask].mean())
    hit = indices[0, 1].tolist().index(3) if 3 in indices[0, 1].tolist() else None
    expected = F.softmax(values[0, 1], -1)[hit] if hit is not None else torch.tensor(0.0)
    torch.testing.assert_close(weights[0, 1], expected)


def conversations(n=12):
    records = []
    for i in range(n):
        name, color = NAMES[i % len(NAMES)], COLORS[i % len(COLORS)]
        records.append(
            {
                "messages": [
                    {"role": "user", "content": f"What color is {name}?"},
                    {"role": "assistant", "content": f"The secret color of {name} is {color}. Answer: {color}"},
                ]
            }
        )
    return records


@pytest.fixture
def extracted(tmp_path, tiny_model_dir):
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in conversations()) + "\n")
    args = extract_parser().parse_args(
        [
            "--data_file",
            str(data),
            "--output_file",
            str(tmp_path / "teacher.parquet"),
            "--filtered_data_file",
            str(tmp_path / "kept.jsonl"),
            "--model_name",
            tiny_model_dir,
            "--topk",
            "8",
            "--batch_size",
            "4",
        ]
    )
    run_extraction(args, log=None)
    return tmp_path / "kept.jsonl", tmp_path / "teacher.parquet"


@pytest.fixture
def student_dir(tmp_path_factory, tiny_model_dir):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("student")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    build_model(tokenizer, seed=7).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_config(path: Path, student, data, logits, **overrides) -> str:
    config = {
        "model_name": student,
        "trainer": {
            "max_steps": 25,
            "learning_rate": 1e-2,
            "per_device_train_batch_size": 4,
            "logging_steps": 1,
            "save_strategy": "no",
            "lr_scheduler_type": "constant",
            "seed": 0,
        },
        "train": {"data_path": str(data), "teacher_logits": str(logits)},
        "loss_multi": 1.0,
        "max_seq_length": 128,
        **overrides,
    }
    path.write_text(json.dumps(config))
    return str(path)


def test_distillation_trains_and_saves(tmp_path, extracted, student_dir):
    data, logits = extracted
    config = write_config(
        tmp_path / "distill.json",
        student_dir,
        data,
        logits,
        validation={"data_path": str(data), "teacher_logits": str(logits)},
    )
    trainer = run_distillation(config, str(tmp_path / "student-out"), log=None)
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert len(history) == 25
    first, last = history[0], history[-1]
    assert last["loss"] < 0.5 * first["loss"]
    assert last["kd_loss"] < first["kd_loss"] and last["sft_loss"] < first["sft_loss"]
    assert (tmp_path / "student-out" / "model.safetensors").exists()
    assert (tmp_path / "student-out" / "tokenizer.json").exists()
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == metrics["eval_loss"] and "eval_kd_loss" in metrics


def test_lora_distillation_trains_only_the_adapter(tmp_path, extracted, student_dir):
    data, logits = extracted
    config = write_config(
        tmp_path / "distill.json",
        student_dir,
        data,
        logits,
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    )
    trainer = run_distillation(config, str(tmp_path / "lora-out"), log=None)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert (tmp_path / "lora-out" / "adapter_config.json").exists()


def test_misaligned_files_name_the_first_mismatch(tmp_path, extracted, student_dir):
    data, logits = extracted
    lines = data.read_text().splitlines()
    lines[3], lines[4] = lines[4], lines[3]
    (tmp_path / "swapped.jsonl").write_text("\n".join(lines) + "\n")
    config = write_config(tmp_path / "c.json", student_dir, tmp_path / "swapped.jsonl", logits)
    with pytest.raises(ValueError, match="first mismatch at row 3, idx 4 in the JSONL vs idx 3 in the Parquet"):
        run_distillation(config, str(tmp_path / "out"), log=None)
    (tmp_path / "short.jsonl").write_text("\n".join(lines[:5]) + "\n")
    config = write_config(tmp_path / "c.json", student_dir, tmp_path / "short.jsonl", logits)
    with pytest.raises(ValueError, match="5 records but .* has 12 rows"):
        run_distillation(config, str(tmp_path / "out"), log=None)


def test_positions_that_do_not_match_the_student_are_refused(tmp_path, extracted, student_dir):
    data, logits = extracted
    records = [json.loads(line) for line in data.read_text().splitlines()]
    records[2]["messages"][1]["content"] += " Answer: red"  # more assistant tokens than the teacher scored
    (tmp_path / "edited.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    config = write_config(tmp_path / "c.json", student_dir, tmp_path / "edited.jsonl", logits)
    with pytest.raises(ValueError, match="idx 2: the Parquet holds .* top-8 positions but the student's chat template"):
        run_distillation(config, str(tmp_path / "out"), log=None)


def test_another_vocabulary_is_refused(tmp_path, extracted):
    data, logits = extracted
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    other = tmp_path / "other-student"
    build_model(tokenizer).save_pretrained(other)
    tokenizer.save_pretrained(other)
    config = write_config(tmp_path / "c.json", str(other), data, logits)
    with pytest.raises(ValueError, match="differs from the student's"):
        run_distillation(config, str(tmp_path / "out"), log=None)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"load_in_8bit": True}, "load_in_8bit needs the bitsandbytes package and a CUDA GPU"),
        ({"lossmulti": 2}, "unknown keys \\['lossmulti'\\]"),
        ({"trainer": {"learning_rat": 1e-3}}, "not SFTConfig fields: \\['learning_rat'\\]"),
        ({"pad_token": "<nope>"}, "pad_token '<nope>' is not in the student's vocabulary"),
        ({"validation": {"data_path": "x.jsonl"}}, "section `validation` lacks \\['teacher_logits'\\]"),
    ],
)
def test_config_errors(tmp_path, extracted, student_dir, overrides, message):
    data, logits = extracted
    config = write_config(tmp_path / "c.json", student_dir, data, logits, **overrides)
    with pytest.raises(ValueError, match=message):
        run_distillation(config, str(tmp_path / "out"), log=None)
    assert not (tmp_path / "out").exists()


@pytest.mark.processes
def test_cli_reports_errors_in_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "distill_sft.py"),
            "--config_file",
            str(tmp_path / "missing.json"),
            "--output_dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 2 and "distill_sft: error: --config_file" in result.stderr


@pytest.mark.usefixtures("requires_smollm")
@pytest.mark.slow
@pytest.mark.processes
def test_both_clis_on_the_default_model_and_the_bundled_chat_data(tmp_path):
    """The README's two commands on SmolLM2 and the bundled chat records, cut to top-10 and 2 steps."""
    env = {"HF_HUB_OFFLINE": "1"}
    out = tmp_path / "offline"
    extract = [
        sys.executable,
        str(ROOT / "scripts" / "extract_logits.py"),
        "--data_file",
        str(ROOT / "trl_sdft" / "resources" / "offline" / "chat.jsonl"),
        "--output_file",
        str(out / "teacher.parquet"),
        "--filtered_data_file",
        str(out / "kept.jsonl"),
        "--topk",
        "10",
    ]
    result = subprocess.run(extract, capture_output=True, text=True, timeout=3600, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kept 64 of 68 records; skipped 4 records" in result.stdout
    config = json.loads((ROOT / "configs" / "distill_config.json").read_text())
    config["train"] = {"data_path": str(out / "kept.jsonl"), "teacher_logits": str(out / "teacher.parquet")}
    config["trainer"].update(max_steps=2, logging_steps=1)
    (tmp_path / "distill.json").write_text(json.dumps(config))
    distill = [
        sys.executable,
        str(ROOT / "scripts" / "distill_sft.py"),
        "--config_file",
        str(tmp_path / "distill.json"),
        "--output_dir",
        str(out / "student"),
    ]
    result = subprocess.run(distill, capture_output=True, text=True, timeout=3600, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "student" / "model.safetensors").exists() and (out / "student" / "tokenizer.json").exists()
    assert "kd_loss" in result.stdout + result.stderr


def test_per_sequence_mean_agrees_with_sdft_for_empty_sequences():
    """One aggregation for both losses: a sequence without positions counts as 0 in the mean over sequences."""
    from trl_sdft.losses import sequence_mean

    values = torch.tensor([[1.0, 3.0, 5.0], [7.0, 9.0, 11.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    from trl_sdft.offline.kd import _reduce

    assert _reduce(values, mask, per_token=False) == sequence_mean(values, mask) == torch.tensor(1.0)
    assert _reduce(values, mask, per_token=True) == torch.tensor(2.0)
