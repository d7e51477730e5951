"""The losses from hidden states (`chunked_loss.py`) equal the logits path, values and gradients, in float32."""

import pytest
import torch
from helpers import run_job

from trl_sdft import chunked_loss, losses
from trl_sdft.importance import ImportanceSettings
from trl_sdft.testing import assert_same_step

B, T, H, V = 3, 7, 16, 97


def inputs(seed=0, skip=0):
    g = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(B, T, H, generator=g)
    teacher_hidden = torch.randn(B, T, H, generator=g)
    student_weight = torch.randn(V, H, generator=g) * 0.5
    teacher_weight = torch.randn(V, H, generator=g) * 0.5
    token_ids = torch.randint(0, V, (B, T), generator=g)
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[1, 4:] = 0  # padding
    completion_mask[2, 1:] = 0
    mask = losses.loss_mask(completion_mask, skip)
    rollout_logps = -torch.rand(B, T, generator=g) * 3
    return student_hidden, student_weight, teacher_hidden, teacher_weight, token_ids, mask, rollout_logps


def unfused(student_hidden, student_weight, teacher_hidden, teacher_weight, token_ids, mask, rollout, spec):
    student_logits = chunked_loss.project(student_hidden, student_weight, spec.temperature)
    teacher_logits = chunked_loss.project(teacher_hidden, teacher_weight, spec.temperature)
    # An independent reference: the divergence functions composed directly, not through `losses.per_token_loss`.
    if spec.mode == "topk_logits":
        per_token = losses.topk_logits_loss(
            student_logits, teacher_logits, spec.topk, spec.alpha, spec.add_tail, spec.support
        )
    elif spec.mode == "full_logits":
        per_token = losses.generalized_jsd(student_logits.log_softmax(-1), teacher_logits.log_softmax(-1), spec.alpha)
    else:
        per_token = losses.sampled_token_loss(
            losses.token_log_probs(student_logits, token_ids), losses.token_log_probs(teacher_logits, token_ids)
        )
    if spec.importance.is_clip is not None:
        student_logps = losses.token_log_probs(student_logits, token_ids).detach()
        per_token = per_token * (student_logps - rollout).exp().clamp(max=spec.importance.is_clip)
    return losses.sequence_mean(per_token, mask), per_token


def value_and_grads(fn, tensors):
    student_hidden, student_weight, *rest = tensors
    student_hidden = student_hidden.clone().requires_grad_(True)
    student_weight = student_weight.clone().requires_grad_(True)
    loss = fn(student_hidden, student_weight, *rest)
    loss.backward()
    return loss.detach(), student_hidden.grad, student_weight.grad


CASES = (
    [dict(mode="full_logits", alpha=alpha) for alpha in (0.0, 0.5, 1.0)]
    + [
        dict(mode="topk_logits", alpha=alpha, topk=5, add_tail=tail, support=support)
        for alpha in (0.0, 0.5, 1.0)
        for tail in (False, True)
        for support in ("student", "teacher", "union")
    ]
    + [dict(mode="sampled_token", alpha=1.0)]
)


@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(str(v) for v in case.values()))
@pytest.mark.parametrize("chunk_size", [4, 1024])
def test_chunked_equals_unfused(case, chunk_size):
    tensors = inputs(skip=1)
    spec = losses.LossSettings(**case, temperature=0.7, chunk_size=chunk_size)
    rollout = tensors[-1]
    expected = value_and_grads(lambda *t: unfused(*t[:-1], rollout, spec)[0], tensors)
    actual = value_and_grads(lambda *t: chunked_loss.chunked_loss(*t[:-1], spec)[0], tensors)
    for want, got in zip(expected, actual, strict=True):
        assert torch.allclose(want, got, atol=1e-5, rtol=1e-5), (want - got).abs().max()


@pytest.mark.parametrize("mode", ["topk_logits", "sampled_token"])
def test_chunked_with_importance_clipping_and_outputs(mode):
    tensors = inputs(seed=1)
    spec = losses.LossSettings(mode=mode, alpha=1.0, topk=5, chunk_size=5, importance=ImportanceSettings(is_clip=1.5))
    rollout = tensors[-1]
    expected = value_and_grads(lambda *t: unfused(*t[:-1], rollout, spec)[0], tensors)
    actual = value_and_grads(
        lambda *t: chunked_loss.chunked_loss(*t[:-1], spec, old_per_token_logps=rollout)[0], tensors
    )
    for want, got in zip(expected, actual, strict=True):
        assert torch.allclose(want, got, atol=1e-5, rtol=1e-5)
    _, per_token, logps, kl = chunked_loss.chunked_loss(*tensors[:-1], spec, old_per_token_logps=rollout)
    mask = tensors[5].bool()
    _, want_per_token = unfused(*tensors[:-1], rollout, spec)
    want_logps = losses.token_log_probs(chunked_loss.project(tensors[0], tensors[1], 1.0), tensors[4])
    student_logits = chunked_loss.project(tensors[0], tensors[1], 1.0)
    teacher_logits = chunked_loss.project(tensors[2], tensors[3], 1.0)
    want_kl = losses.kl(teacher_logits.log_softmax(-1), student_logits.log_softmax(-1))
    for got, want in ((per_token, want_per_token), (logps, want_logps), (kl, want_kl)):
        assert torch.allclose(got[mask], want[mask], atol=1e-5)
        assert not got[~mask].any()  # positions outside the loss are not computed


def test_chunked_gradient_scales_with_the_upstream_gradient():
    tensors = inputs(seed=2)
    spec = losses.LossSettings(mode="topk_logits", alpha=0.5, topk=5)
    once = value_and_grads(lambda *t: chunked_loss.chunked_loss(*t[:-1], spec)[0], tensors)
    thrice = value_and_grads(lambda *t: 3 * chunked_loss.chunked_loss(*t[:-1], spec)[0], tensors)
    assert torch.allclose(thrice[1], 3 * once[1]) and torch.allclose(thrice[2], 3 * once[2])


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_liger_jsd_equals_full_logits(alpha):
    """Liger's beta convention, checked: beta == distillation_alpha gives our full_logits loss."""
    pytest.importorskip("liger_kernel")
    tensors = inputs(seed=3, skip=1)
    spec = losses.LossSettings(mode="full_logits", alpha=alpha, temperature=0.8)
    expected = value_and_grads(lambda *t: unfused(*t[:-1], None, spec)[0], tensors)

    def liger(student_hidden, student_weight, teacher_hidden, teacher_weight, token_ids, mask):
        return chunked_loss.liger_jsd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, mask, alpha, 0.8, chunk_size=4
        )[0]

    actual = value_and_grads(lambda *t: liger(*t[:-1]), tensors)
    for want, got in zip(expected, actual, strict=True):
        assert torch.allclose(want, got, atol=1e-5, rtol=1e-5), (want - got).abs().max()


# ---------------------------------------------------------------------------------------------- in the trainer
TRAINER_MODES = [
    dict(distillation_mode="topk_logits", distillation_alpha=0.5),
    dict(
        distillation_mode="topk_logits",
        distillation_alpha=0.0,
        distillation_add_tail=True,
        distillation_topk_support="union",
    ),
    dict(distillation_mode="full_logits", distillation_alpha=0.0),
    dict(distillation_mode="sampled_token", distillation_alpha=1.0),
]
TEACHERS = [("base", False), ("live", False), ("ema", False), ("base", True), ("ema", True)]


@pytest.fixture
def build_trainer(tiny_config, lora_config):
    """A factory: an SDFTTrainer on the toy facts, 1 completion token skipped, LoRA on request."""

    def build(model_dir, tokenizer, tmp_path, use_lora, **overrides):
        from datasets import Dataset

        from trl_sdft import SDFTTrainer
        from trl_sdft.testing import facts_rows

        return SDFTTrainer(
            model=model_dir,
            args=tiny_config(tmp_path, num_loss_tokens_to_skip=1, **overrides),
            train_dataset=Dataset.from_list(facts_rows()),
            processing_class=tokenizer,
            peft_config=lora_config(task_type=None) if use_lora else None,
        )

    return build


@pytest.mark.parametrize("kind, use_lora", TEACHERS, ids=lambda v: str(v))
@pytest.mark.parametrize("mode", TRAINER_MODES, ids=lambda m: "-".join(str(v) for v in m.values()))
def test_trainer_chunked_loss_equals_logits_path(
    tiny_model_dir,
    tokenizer,
    tmp_path,
    mode,
    kind,
    use_lora,
    build_trainer,
):
    from trl_sdft.testing import facts_rows

    common = dict(teacher_model_kind=kind, **mode)
    reference = build_trainer(tiny_model_dir, tokenizer, tmp_path / "a", use_lora, loss_chunk_size=0, **common)
    chunked = build_trainer(tiny_model_dir, tokenizer, tmp_path / "b", use_lora, loss_chunk_size=5, **common)
    batch = reference.build_batch(facts_rows()[:4], "train")
    assert_same_step(reference, chunked, batch, rtol=1e-4)


@pytest.mark.parametrize("kind, use_lora", TEACHERS, ids=lambda v: str(v))
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_trainer_liger_equals_full_logits(tiny_model_dir, tokenizer, tmp_path, alpha, kind, use_lora, build_trainer):
    from trl_sdft.testing import facts_rows

    common = dict(teacher_model_kind=kind, distillation_mode="full_logits", distillation_alpha=alpha)
    reference = build_trainer(tiny_model_dir, tokenizer, tmp_path / "a", use_lora, loss_chunk_size=0, **common)
    liger = build_trainer(tiny_model_dir, tokenizer, tmp_path / "b", use_lora, use_liger_kernel=True, **common)
    batch = reference.build_batch(facts_rows()[:4], "train")
    assert_same_step(reference, liger, batch, rtol=1e-4)


@pytest.mark.parametrize("overrides", [dict(loss_chunk_size=4), dict(use_liger_kernel=True)], ids=["chunked", "liger"])
def test_training_from_hidden_states_runs_and_learns(tiny_model_dir, tokenizer, tmp_path, overrides, build_trainer):
    trainer = build_trainer(
        tiny_model_dir,
        tokenizer,
        tmp_path,
        False,
        distillation_mode="full_logits",
        distillation_alpha=0.0,
        max_steps=3,
        **overrides,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    history = [e for e in trainer.state.log_history if "loss" in e]
    assert len(history) == 3 and all("self_distillation/distillation_loss" in e for e in history)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(use_liger_kernel=True, distillation_mode="topk_logits"), "set `distillation_mode='full_logits'`"),
        (
            dict(
                use_liger_kernel=True,
                distillation_mode="full_logits",
                num_iterations=2,
            ),
            "importance-sampling clipping applies",
        ),
        (dict(loss_chunk_size=-1), "must be >= 1"),
    ],
)
def test_bad_loss_path_settings(tmp_path, overrides, message, tiny_config):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **overrides)


def test_scaled_logits_models_are_refused(tiny_model_dir, tokenizer, tmp_path, build_trainer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        build_trainer(model, tokenizer, tmp_path, False, loss_chunk_size=8)
    # By default such a model silently keeps the logits path.
    assert build_trainer(model, tokenizer, tmp_path, False).loss_chunk_size == 0


def test_default_is_the_chunked_path_and_zero_the_logits_path(tiny_model_dir, tokenizer, tmp_path, build_trainer):
    from trl_sdft.config import DEFAULT_LOSS_CHUNK_SIZE

    assert build_trainer(tiny_model_dir, tokenizer, tmp_path, False).loss_chunk_size == DEFAULT_LOSS_CHUNK_SIZE
    assert build_trainer(tiny_model_dir, tokenizer, tmp_path, False, loss_chunk_size=0).loss_chunk_size == 0


@pytest.mark.parametrize("path", ["liger", "chunked"])
@pytest.mark.processes
def test_two_process_ddp_keeps_ranks_identical(tiny_model_dir, tmp_path, path):
    import json
    import os
    import sys

    job = os.path.join(os.path.dirname(__file__), "jobs", "ddp_chunked_loss.py")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    outputs = [tmp_path / f"rank-{rank}.json" for rank in (0, 1)]
    run_job([*command, job, tiny_model_dir, str(tmp_path), path], tmp_path, outputs)
    ranks = [json.loads(output.read_text()) for output in outputs]
    assert ranks[0]["world"] == 2 and len(ranks[0]["losses"]) == 3
    assert ranks[0]["checksums"] == ranks[1]["checksums"]
    start = {name: float(p.detach().double().sum()) for name, p in _load(tiny_model_dir).named_parameters()}
    assert start["lm_head.weight"] != ranks[0]["checksums"]["lm_head.weight"]  # the lm_head was trained


def _load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)


def test_settings_pick_the_loss_function(tmp_path, tiny_config):
    from trl_sdft.settings import loss_settings

    logits_path = loss_settings(tiny_config(tmp_path), chunk_size=0)
    assert chunked_loss.loss_function(logits_path) is losses.logits_loss
    chunked = loss_settings(tiny_config(tmp_path), chunk_size=16)
    assert chunked.chunk_size == 16 and chunked_loss.loss_function(chunked) is chunked_loss.hidden_states_loss
    liger_args = tiny_config(
        tmp_path, use_liger_kernel=True, distillation_mode="full_logits", distillation_is_clip=None
    )
    liger = loss_settings(liger_args, chunk_size=16)
    assert liger.use_liger and chunked_loss.loss_function(liger) is chunked_loss.liger_loss
    assert not loss_settings(liger_args, chunk_size=0).use_liger  # the logits path has no Liger


# ------------------------------------------------------------------------------------- bf16 mixed precision (CPU)
def head_casts(trainer, batch) -> int:
    """How many times one training step (loss and backward) converts a tensor of the LM-head weight's shape to another
    dtype: each such conversion copies vocab x hidden values."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shape = tuple(trainer.model.get_output_embeddings().weight.shape)
    casts = []

    class CountCasts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
                source = args[-1] if func is torch.ops.aten.copy_.default else args[0]
                if tuple(source.shape) in (shape, shape[::-1]) and source.dtype != out.dtype:
                    casts.append(func)
            return out

    trainer.model.zero_grad()
    with CountCasts():
        trainer.compute_loss(trainer.model, batch).backward()
    return len(casts)


@pytest.mark.parametrize("kind, use_lora", TEACHERS, ids=lambda v: str(v))
def test_bf16_chunked_loss_equals_logits_path(sharp_model_dir, tokenizer, tmp_path, kind, use_lora, build_trainer):
    """In bf16 autocast (what `bf16=None` gives on CPUs with native bf16 and on GPUs) the chunked loss, with its weights
    cast once per step, agrees with the logits path within bf16 precision, for every teacher kind."""
    from trl_sdft.testing import facts_rows

    common = dict(teacher_model_kind=kind, bf16=True, distillation_mode="topk_logits", distillation_alpha=0.5)
    reference = build_trainer(sharp_model_dir, tokenizer, tmp_path / "a", use_lora, loss_chunk_size=0, **common)
    chunked = build_trainer(sharp_model_dir, tokenizer, tmp_path / "b", use_lora, loss_chunk_size=5, **common)
    assert chunked.accelerator.mixed_precision == "bf16"
    batch = reference.build_batch(facts_rows()[:4], "train")
    assert_same_step(reference, chunked, batch, atol=2e-2, rtol=5e-2)


@pytest.mark.parametrize("kind, use_lora", [("base", False), ("live", False), ("base", True)], ids=str)
def test_bf16_head_weight_casts_do_not_grow_with_chunks(
    tiny_model_dir, tokenizer, tmp_path, kind, use_lora, build_trainer
):
    """The LM-head weight is cast to bf16 a fixed number of times per step, however many chunks the loss has: casting
    it per chunk (e.g. a matmul with `weight.t()`, which autocast does not cache) made the chunked loss slower than
    the logits path on a CPU."""
    from trl_sdft.testing import facts_rows

    common = dict(teacher_model_kind=kind, bf16=True)
    one = build_trainer(tiny_model_dir, tokenizer, tmp_path / "a", use_lora, loss_chunk_size=10_000, **common)
    many = build_trainer(tiny_model_dir, tokenizer, tmp_path / "b", use_lora, loss_chunk_size=2, **common)
    batch = one.build_batch(facts_rows()[:4], "train")
    assert int(batch["completion_mask"].sum()) > 8  # several chunks of 2
    casts = head_casts(one, batch)
    assert 0 < casts <= 4
    assert head_casts(many, batch) == casts
