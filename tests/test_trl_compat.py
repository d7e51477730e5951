"""`trl_sdft.loss_utils` and `trl_sdft.teacher_sync` against the installed TRL's `trl.experimental.sdft` modules of the
same names: every public name with a compatible signature, the same loss values and gradients, the same EMA teachers."""

import ast
import copy
import importlib
import inspect
import logging
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close
from trl.trainer.utils import selective_log_softmax

import trl_sdft.loss_utils as ours_losses
import trl_sdft.teacher_sync as ours_sync
from trl_sdft.testing import build_model, build_tokenizer

trl_losses = importlib.import_module("trl.experimental.sdft.loss_utils")
trl_sync = importlib.import_module("trl.experimental.sdft.teacher_sync")
PAIRS = {"loss_utils": (trl_losses, ours_losses), "teacher_sync": (trl_sync, ours_sync)}


# (a) names and signatures


def defined_public_names(module) -> list[str]:
    """Top-level names a module's own source defines (functions, classes, assignments), without leading `_`."""
    names = []
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [target.id for target in node.targets if isinstance(target, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
    return [name for name in names if not name.startswith("_")]


PUBLIC = [(key, name) for key, (trl_module, _) in PAIRS.items() for name in defined_public_names(trl_module)]


def test_the_public_names_are_found():
    expected = {
        ("loss_utils", name)
        for name in (
            "compute_divergence",
            "add_tail_bucket",
            "apply_importance_sampling_clipping",
            "compute_topk_self_distillation_loss",
            "compute_full_logit_self_distillation_loss",
            "compute_sampled_token_self_distillation_loss",
        )
    } | {
        ("teacher_sync", name)
        for name in ("is_pure_lora_training", "SyncTeacherModelCallback", "PEFTAdapterEMACallback")
    }
    assert expected <= set(PUBLIC)


def parameters(obj) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(obj).parameters.values()]


@pytest.mark.parametrize("key, name", PUBLIC, ids=[f"{key}.{name}" for key, name in PUBLIC])
def test_public_name_with_compatible_signature(key, name):
    trl_module, our_module = PAIRS[key]
    theirs = getattr(trl_module, name)
    assert hasattr(our_module, name), f"trl_sdft.{key} lacks {name}"
    mine = getattr(our_module, name)
    if isinstance(theirs, logging.Logger):
        assert isinstance(mine, logging.Logger)
        return
    if not callable(theirs):
        assert type(mine) is type(theirs)
        return
    assert theirs.__module__ == trl_module.__name__  # defined there, not imported
    assert parameters(mine) == parameters(theirs)
    if inspect.isclass(theirs):
        methods = [m for m, value in vars(theirs).items() if not m.startswith("_") and inspect.isfunction(value)]
        for method in methods:
            assert parameters(getattr(mine, method)) == parameters(getattr(theirs, method)), method


# (b) the loss functions on the same inputs

SHAPES = [(2, 5, 11), (3, 4, 32), (1, 7, 50)]
ALPHAS = [0.0, 0.25, 0.5, 1.0]
CLIPS = [None, 2.0]


def make_inputs(shape, seed=0):
    """Student and teacher logits, completion ids with right padding (id 0), the mask, and old log-probs."""
    generator = torch.Generator().manual_seed(seed)
    batch, length, vocab = shape
    student = torch.randn(shape, generator=generator) * 3
    teacher = student + torch.randn(shape, generator=generator) * 2
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0] = length - 1 if length > 1 else 1  # at least one padded position
    mask = torch.arange(length) < lengths[:, None]
    ids = torch.randint(vocab, (batch, length), generator=generator).masked_fill(~mask, 0)
    old = selective_log_softmax(student, ids) + torch.randn((batch, length), generator=generator)
    return student, teacher, ids, mask, old


def run(module, loss_fn, student, teacher, ids, mask, old, clip):
    """`loss_fn(student_logits, teacher_logits)` per token, optionally importance-clipped; its masked sequence mean
    and the gradient of that mean with respect to the student's logits."""
    student = student.clone().requires_grad_(True)
    per_token = loss_fn(student, teacher)
    if clip is not None:
        per_token = module.apply_importance_sampling_clipping(
            per_token, selective_log_softmax(student, ids), old, clip_coeff=clip
        )
    maskf = mask.float()
    loss = ((per_token * maskf).sum(-1) / maskf.sum(-1)).mean()
    loss.backward()
    return per_token.detach(), loss.detach(), student.grad


def assert_same(make_loss, shape, clip, degenerate=False):
    """Per-token losses, the masked mean and its gradient agree; `degenerate`: a loss that is 0 by construction."""
    inputs = make_inputs(shape)
    theirs = run(trl_losses, make_loss(trl_losses), *inputs, clip)
    mine = run(ours_losses, make_loss(ours_losses), *inputs, clip)
    for want, got in zip(theirs, mine, strict=True):
        assert_close(got, want)
    assert (theirs[2].abs().max() > 0) != degenerate  # a gradient that means something


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("clip", CLIPS)
def test_full_logit_loss(shape, alpha, clip):
    def make(module):
        return lambda s, t: module.compute_full_logit_self_distillation_loss(s, t, distillation_alpha=alpha)

    assert_same(make, shape, clip)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("add_tail", [False, True])
@pytest.mark.parametrize("topk", [1, 3, 10])
@pytest.mark.parametrize("clip", CLIPS)
def test_topk_loss(shape, alpha, add_tail, topk, clip):
    def make(module):
        return lambda s, t: module.compute_topk_self_distillation_loss(
            s, t, distillation_topk=topk, distillation_alpha=alpha, distillation_add_tail=add_tail
        )

    assert_same(make, shape, clip, degenerate=topk == 1 and not add_tail)  # one renormalised token: no divergence


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("clip", CLIPS)
def test_sampled_token_loss(shape, clip):
    ids = make_inputs(shape)[2]

    def make(module):
        return lambda s, t: module.compute_sampled_token_self_distillation_loss(s, t, ids, distillation_alpha=1.0)

    assert_same(make, shape, clip)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_sampled_token_loss_needs_reverse_kl(alpha):
    student, teacher, ids, *_ = make_inputs((2, 5, 11))
    for module in (trl_losses, ours_losses):
        with pytest.raises(ValueError):
            module.compute_sampled_token_self_distillation_loss(student, teacher, ids, distillation_alpha=alpha)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_divergence_and_tail_bucket(alpha):
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(3, 4, 20, generator=generator).mul(2).log_softmax(-1)
    teacher = torch.randn(3, 4, 20, generator=generator).mul(2).log_softmax(-1)
    want = trl_losses.compute_divergence(student, teacher, alpha)
    assert_close(ours_losses.compute_divergence(student, teacher, alpha), want)
    assert want.shape == (3, 4)
    subset = student[..., :6]  # a top-k subset, leaving out some mass
    assert_close(ours_losses.add_tail_bucket(subset), trl_losses.add_tail_bucket(subset))
    tails = (student[..., :6], teacher[..., :6])
    assert_close(
        ours_losses.compute_divergence(*map(ours_losses.add_tail_bucket, tails), alpha),
        trl_losses.compute_divergence(*map(trl_losses.add_tail_bucket, tails), alpha),
    )


@pytest.mark.parametrize("clip", [0.5, 1.0, 2.0])
def test_importance_sampling_clipping(clip):
    generator = torch.Generator().manual_seed(2)
    loss, student, old = (torch.randn(4, 6, generator=generator) for _ in range(3))
    want = trl_losses.apply_importance_sampling_clipping(loss, student, old, clip)
    assert_close(ours_losses.apply_importance_sampling_clipping(loss, student, old, clip), want)
    assert not torch.equal(want, loss)


# (c) the teacher callbacks


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def lora(**kwargs):
    from peft import LoraConfig

    return LoraConfig(
        **{**dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"), **kwargs}
    )


def peft_model(tokenizer, config, seed=0):
    from peft import get_peft_model

    return get_peft_model(build_model(tokenizer, seed=seed), config)


def lora_with_unfrozen_head(tokenizer):
    model = peft_model(tokenizer, lora())
    model.base_model.model.lm_head.weight.requires_grad_(True)
    return model


def ia3_model(tokenizer):
    from peft import IA3Config

    return peft_model(tokenizer, IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]))


MODELS = {
    "plain": lambda tok: build_model(tok),
    "lora": lambda tok: peft_model(tok, lora()),
    "lora_modules_to_save": lambda tok: peft_model(tok, lora(modules_to_save=["lm_head"])),
    "lora_bias_all_on_bias_free_model": lambda tok: peft_model(tok, lora(bias="all")),
    "lora_unfrozen_head": lora_with_unfrozen_head,
    "ia3": ia3_model,
}
IDENTITY = SimpleNamespace(unwrap_model=lambda model: model)


def test_is_pure_lora_training(tok):
    results = {}
    for name, make in MODELS.items():
        model = make(tok)
        want = trl_sync.is_pure_lora_training(model)
        assert ours_sync.is_pure_lora_training(model) == want, name
        assert ours_sync.is_pure_lora_training(model, IDENTITY) == trl_sync.is_pure_lora_training(model, IDENTITY)
        results[name] = want
    assert set(results.values()) == {True, False}, results


def lora_weights(model, adapter):
    return {n: p for n, p in model.named_parameters() if "lora_" in n and f".{adapter}." in n}


@torch.no_grad()
def move_students(models, generator):
    """Add the same random step to the student adapter of each model (lora_B starts at 0)."""
    names = sorted(lora_weights(models[0], "default"))
    for name in names:
        step = torch.randn(lora_weights(models[0], "default")[name].shape, generator=generator) * 0.1
        for model in models:
            lora_weights(model, "default")[name].add_(step)


@pytest.mark.parametrize("begin", [True, False], ids=["on_train_begin", "lazy"])
@pytest.mark.parametrize("rate, sync_steps", [(0.05, 1), (0.3, 2)])
def test_peft_adapter_ema_callback(tok, begin, rate, sync_steps):
    theirs, mine = peft_model(tok, lora()), peft_model(tok, lora())
    mine.load_state_dict(theirs.state_dict())
    trl_cb = trl_sync.PEFTAdapterEMACallback(theirs, update_rate=rate, sync_steps=sync_steps)
    our_cb = ours_sync.PEFTAdapterEMACallback(mine, update_rate=rate, sync_steps=sync_steps)
    assert {k for k in vars(trl_cb) if not k.startswith("_")} <= set(dir(our_cb))
    args, control, state = SimpleNamespace(), SimpleNamespace(), SimpleNamespace(global_step=0)
    if begin:
        trl_cb.on_train_begin(args, state, control)
        our_cb.on_train_begin(args, state, control)
    generator = torch.Generator().manual_seed(3)
    for step in range(1, 5):
        move_students([theirs, mine], generator)
        state.global_step = step
        trl_cb.on_step_end(args, state, control)
        our_cb.on_step_end(args, state, control)
        if begin or step >= sync_steps:
            want, got = lora_weights(theirs, "teacher"), lora_weights(mine, "teacher")
            assert want.keys() == got.keys() and want
            for name in want:
                assert_close(got[name], want[name], msg=f"step {step}: {name}")
    assert any(p.abs().max() > 0 for n, p in lora_weights(theirs, "teacher").items() if "lora_B" in n)
    assert trl_cb.shadow_weights.keys() == our_cb.shadow_weights.keys()
    for key, value in trl_cb.shadow_weights.items():
        assert_close(our_cb.shadow_weights[key], value)
    assert theirs.active_adapter == mine.active_adapter == "default"
    trainable = [[n for n, p in m.named_parameters() if p.requires_grad] for m in (theirs, mine)]
    assert trainable[0] == trainable[1]


def test_only_the_teacher_adapter_name_is_supported(tok):
    """A known difference: TRL accepts any adapter name; `EMAAdapterTeacher` always names its adapter "teacher"."""
    with pytest.raises(ValueError, match="teacher_adapter_name"):
        ours_sync.PEFTAdapterEMACallback(peft_model(tok, lora()), teacher_adapter_name="ema")


class Wrapped(torch.nn.Module):
    """A stand-in for a DDP wrapper: the model under `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.fixture
def accelerate_state():
    """An initialised accelerate state (TRL's model sync reads it, as under a trainer); reset afterwards."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    Accelerator(cpu=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "wrapped"])
def test_sync_teacher_model_callback(tok, wrapped, accelerate_state):
    student = build_model(tok, seed=1)
    their_teacher = build_model(tok, seed=2)
    my_teacher = copy.deepcopy(their_teacher)
    initial = copy.deepcopy(their_teacher.state_dict())
    accelerator = SimpleNamespace(unwrap_model=lambda model: model.module) if wrapped else None
    trl_cb = trl_sync.SyncTeacherModelCallback(teacher_model=their_teacher, accelerator=accelerator)
    our_cb = ours_sync.SyncTeacherModelCallback(teacher_model=my_teacher, accelerator=accelerator)
    assert {k for k in vars(trl_cb) if not k.startswith("_")} <= set(dir(our_cb))
    args = SimpleNamespace(teacher_sync_steps=2, teacher_update_rate=0.1)
    generator = torch.Generator().manual_seed(4)
    for step in range(1, 5):
        with torch.no_grad():
            for param in student.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        state = SimpleNamespace(global_step=step)
        model = Wrapped(student) if wrapped else student
        trl_cb.on_step_end(args, state, SimpleNamespace(), model=model)
        our_cb.on_step_end(args, state, SimpleNamespace(), model=model)
        for name, value in their_teacher.state_dict().items():
            assert_close(my_teacher.state_dict()[name], value, msg=f"step {step}: {name}")
    assert any(not torch.equal(value, initial[name]) for name, value in their_teacher.state_dict().items())
