"""Checks that need a CUDA GPU (marked `gpu`, skipped without one): bf16 training for every teacher kind, LoRA and full;
the chunked loss against the logits path and padding-free forwards against padded ones in bf16; flash-attention packing
and colocated vLLM when those are installed.

    python -m pytest -m gpu tests/test_gpu.py
"""

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BF16_ATOL = 2e-2  # bf16 keeps 8 bits of mantissa: values of order 1 agree to ~1e-2


@pytest.fixture
def gpu_config(tiny_config):
    """`tiny_config` on the GPU in bf16 mixed precision (what `bf16=None` resolves to there)."""

    def make(output_dir, **overrides):
        return tiny_config(output_dir, use_cpu=False, bf16=None, **overrides)

    return make


def build(model_dir, tokenizer, args, peft_config=None):
    from datasets import Dataset

    from trl_sdft import SDFTTrainer
    from trl_sdft.testing import facts_rows

    return SDFTTrainer(
        model_dir,
        args=args,
        train_dataset=Dataset.from_list(facts_rows()),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


@pytest.mark.parametrize("kind", ["base", "live", "ema"])
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_bf16_training_steps(tiny_model_dir, tokenizer, tmp_path, gpu_config, lora_config, kind, use_lora):
    from trl_sdft.testing import logged_losses, snapshot

    args = gpu_config(tmp_path, teacher_model_kind=kind, max_steps=3)
    assert args.bf16, "bf16=None must resolve to bf16 on a GPU that supports it"
    trainer = build(tiny_model_dir, tokenizer, args, lora_config(task_type=None) if use_lora else None)
    assert trainer.accelerator.device.type == "cuda" and trainer.accelerator.mixed_precision == "bf16"
    before = snapshot(trainer.model)
    trainer.train()
    losses = logged_losses(trainer)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = snapshot(trainer.model)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed and (not use_lora or all("lora_" in name for name in changed))


def same_step(reference, other, batch):
    from trl_sdft.testing import assert_same_step

    assert_same_step(reference, other, batch, atol=BF16_ATOL)


@pytest.mark.parametrize("mode", ["topk_logits", "full_logits", "sampled_token"])
def test_bf16_chunked_loss_equals_logits_path(sharp_model_dir, tokenizer, tmp_path, gpu_config, mode):
    from trl_sdft.testing import facts_rows

    extra = dict(distillation_alpha=1.0) if mode == "sampled_token" else {}
    logits = build(
        sharp_model_dir, tokenizer, gpu_config(tmp_path / "a", distillation_mode=mode, loss_chunk_size=0, **extra)
    )
    chunked = build(
        sharp_model_dir, tokenizer, gpu_config(tmp_path / "b", distillation_mode=mode, loss_chunk_size=5, **extra)
    )
    for trainer in (logits, chunked):
        trainer.model.train()
        trainer.model = trainer.accelerator.prepare(trainer.model)  # bf16 autocast around the forward, as in training
    batch = logits.build_batch(facts_rows()[:4], "train")
    same_step(logits, chunked, batch)


@pytest.mark.parametrize("attention", ["sdpa", "flash_attention_2"])
def test_bf16_padding_free_equals_padded(sharp_model_dir, tokenizer, tmp_path, gpu_config, attention):
    from trl_sdft.testing import facts_rows

    if attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    kwargs = dict(model_init_kwargs={"attn_implementation": attention}, num_loss_tokens_to_skip=1)
    padded = build(sharp_model_dir, tokenizer, gpu_config(tmp_path / "a", padding_free=False, **kwargs))
    packed = build(sharp_model_dir, tokenizer, gpu_config(tmp_path / "b", **kwargs))
    assert packed.padding_free and packed.forward_settings.pack_capacity == (
        None if attention.startswith("flash") else 0
    )
    for trainer in (padded, packed):
        trainer.model.train()
        trainer.model = trainer.accelerator.prepare(trainer.model)
    batch = padded.build_batch(facts_rows()[:4], "train")
    same_step(padded, packed, batch)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
@pytest.mark.processes
def test_vllm_colocate_on_the_gpu(tmp_path):
    """Colocated vLLM with the in-place weight reload, in bf16 (the job prints its measurements)."""
    import json
    import os
    import subprocess
    import sys

    from trl_sdft.testing import build_model, build_tokenizer

    model_dir = tmp_path / "model"
    tokenizer = build_tokenizer()
    build_model(tokenizer, hidden_size=64, heads=2).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    job = os.path.join(os.path.dirname(__file__), "jobs", "vllm_colocate.py")
    run = subprocess.run(
        [sys.executable, job, str(model_dir), str(tmp_path / "out"), "--gpu"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["sync_method"] == "reload" and result["rounds"] == 3
    assert result["synced_max"] < 0.1  # bf16 engine vs bf16 autocast trainer
    assert all(abs(r - 1) < 0.1 for r in result["importance_ratios"])
