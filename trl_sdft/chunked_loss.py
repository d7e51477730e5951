"""The SDFT loss from hidden states and LM-head weights, without `[tokens, vocab]` logits for the whole batch.

Which path a run takes is decided once, by `resolve_chunk_size` (into `LossSettings.chunk_size`), and `loss_function`
hands the trainer the matching function; every path returns a `losses.LossOutput`:

- `losses.logits_loss` (chunk size 0): the batch's logits, as TRL does.
- `hidden_states_loss`: every distillation mode, token chunks of `chunk_size`. Each chunk's logits are projected,
  reduced to its loss by `losses.per_token_loss` (the same function the logits path calls) and turned into gradients
  for the hidden states and the LM head right away (inside the forward, as Liger does), then freed: the extra memory is
  one chunk's logits and their gradient, O(chunk x vocab), and the matmuls are as many as the logits path's. The
  per-token weights (the masked per-sequence mean) are applied inside, so the result is the same scalar loss.
- `liger_loss`: Liger's fused linear JSD (`liger_kernel.chunked_loss`), `full_logits` only, once per sequence so that
  its token mean becomes our per-sequence mean. Liger's `beta` is our `distillation_alpha` (checked numerically by the
  tests: beta 0 is KL(teacher || student), 1 is KL(student || teacher), mixture `(1-beta) s + beta t`).
"""

import logging
from typing import NamedTuple

import torch
from torch import nn

from . import importance, losses
from .losses import LossOutput, LossSettings
from .utils import unwrap

logger = logging.getLogger(__name__)
# Tokens per chunk when `loss_chunk_size=None`; see benchmarks/loss_memory.py for the measurements behind it.
DEFAULT_LOSS_CHUNK_SIZE = 128


class HiddenStates(NamedTuple):
    """Last-layer hidden states `[B, T, H]` at the positions that predict the completion, and the LM-head weight."""

    hidden: torch.Tensor
    weight: torch.Tensor


def scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits divided by the sampling temperature (a full pass over `[tokens, vocab]`, skipped at temperature 1)."""
    return logits if temperature == 1.0 else logits / temperature


def project(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """Float32 logits of `hidden @ weight.T`, divided by the sampling temperature (as the logits path does)."""
    return scaled(nn.functional.linear(hidden, weight).float(), temperature)


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` at autocast's dtype where it is on, else at `b`'s (the weight's or the hidden states' dtype)."""
    if not torch.is_autocast_enabled(a.device.type):
        a = a.to(b.dtype)
    return a @ b


def _chunk_loss(settings: LossSettings, student_logits, teacher_logits, token_ids, token_weights, old_logps, sampling):
    """Weighted loss sum of one chunk, its per-token losses, the student's token log-probs and the teacher-student KL."""
    per_token, student_logps, kl = losses.per_token_loss(
        settings, student_logits, teacher_logits, token_ids, old_logps, sampling, with_kl=True
    )
    return (per_token * token_weights).sum(), per_token.detach(), student_logps, kl


def head_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` as the chunks' matmuls should take it, so that it is cast to autocast's dtype once per step, not once per
    matmul (each cast copies the vocab x hidden weight; under bf16 autocast on a CPU that costs more than a chunk).

    A trainable float32 weight is returned as is: autocast caches its cast for the whole autocast region, which the
    trainer opens around `compute_loss`, so the model's own LM-head forward and every chunk share one copy. Autocast
    does not cache frozen weights (a teacher copy, a LoRA model's head): those are cast here, once per call."""
    device_type = weight.device.type
    if not torch.is_autocast_enabled(device_type) or weight.dtype != torch.float32:
        return weight
    if weight.requires_grad and weight.is_leaf and torch.is_autocast_cache_enabled():
        return weight
    return weight.detach().to(torch.get_autocast_dtype(device_type))


class ChunkedSelfDistillation(torch.autograd.Function):
    """Loss `sum_i w_i * loss_i` over tokens `i`, in chunks; gradients for the student's hidden states and weight.

    The LM-head matmuls run at the trainer's precision (autocast's dtype when it is on), the weights cast once per
    step (`head_weight`); the per-token loss is computed in float32; the weight gradient accumulates in float32 across
    chunks, as autograd's does in `.grad`. Matmuls take the weights untransposed (`linear`, `@ weight`): autocast
    caches casts of parameters only, not of views such as `weight.t()`."""

    @staticmethod
    def forward(
        ctx,
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        token_ids,
        token_weights,
        old_per_token_logps,
        sampling_logps,
        settings,
    ):
        weight = head_weight(student_weight)
        shared = teacher_weight.data_ptr() == student_weight.data_ptr() and teacher_weight.shape == weight.shape
        teacher = weight if shared else head_weight(teacher_weight)  # a live teacher or an unadapted head: one cast
        grad_hidden = torch.empty_like(student_hidden)
        grad_weight = None
        total = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
        per_token, student_logps, kls = [], [], []
        chunk = settings.chunk_size or max(1, student_hidden.size(0))  # 0: the whole batch as one chunk
        for start in range(0, student_hidden.size(0), chunk):
            rows = slice(start, start + chunk)
            hidden = student_hidden[rows]
            # The gradient is taken w.r.t. the chunk's logits only (a leaf here); the two matmuls that carry it to the
            # hidden states and the weight are done by hand; the weight's accumulates in float32 across chunks.
            raw = nn.functional.linear(hidden, weight).float().requires_grad_(True)
            teacher_logits = project(teacher_hidden[rows], teacher, settings.temperature)
            with torch.enable_grad():
                chunk_total, chunk_losses, chunk_logps, chunk_kl = _chunk_loss(
                    settings,
                    scaled(raw, settings.temperature),
                    teacher_logits,
                    token_ids[rows],
                    token_weights[rows],
                    None if old_per_token_logps is None else old_per_token_logps[rows],
                    None if sampling_logps is None else sampling_logps[rows],
                )
                del teacher_logits
                (grad_raw,) = torch.autograd.grad(chunk_total, raw)
            del raw
            grad_hidden[rows] = _matmul(grad_raw, weight)
            if grad_weight is None:  # the first chunk's product starts the float32 accumulator (no zero fill)
                grad_weight = _matmul(grad_raw.t(), hidden).float()
            elif grad_weight.dtype == hidden.dtype and not torch.is_autocast_enabled(hidden.device.type):
                grad_weight.addmm_(grad_raw.t().to(hidden.dtype), hidden)  # in place: no weight-sized temporary
            else:
                grad_weight += _matmul(grad_raw.t(), hidden)
            del grad_raw
            total += chunk_total.detach()
            per_token.append(chunk_losses)
            student_logps.append(chunk_logps)
            kls.append(chunk_kl)
        # Kept as plain attributes, not saved tensors, and dropped in backward: with no other reference left autograd
        # can take the weight gradient as `.grad` instead of copying it (one weight-sized buffer less).
        ctx.grads = (grad_hidden, grad_weight.to(student_weight.dtype))
        per_token, student_logps, kls = torch.cat(per_token), torch.cat(student_logps), torch.cat(kls)
        ctx.mark_non_differentiable(per_token, student_logps, kls)
        return total, per_token, student_logps, kls

    @staticmethod
    def backward(ctx, grad_total, _grad_per_token, _grad_logps, _grad_kl):
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        if grad_total is not None and not bool(grad_total == 1):
            grad_hidden, grad_weight = grad_hidden * grad_total, grad_weight * grad_total
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def sequence_mean_weights(mask: torch.Tensor) -> torch.Tensor:
    """Per-token weights `[B, T]` that turn a weighted sum into `losses.sequence_mean(per_token, mask)`."""
    mask = mask.float()
    return mask / (mask.sum(-1, keepdim=True).clamp(min=1.0) * mask.size(0))


def chunked_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    token_ids: torch.Tensor,
    mask: torch.Tensor,
    settings: LossSettings,
    old_per_token_logps: torch.Tensor | None = None,
    sampling_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The masked per-sequence mean loss from `[B, T, H]` hidden states (positions predicting `token_ids` `[B, T]`).

    Returns the scalar loss and, detached, `[B, T]`: the per-token losses, the student's token log-probs and the
    full-vocabulary KL(teacher || student) (the `teacher_student_kl` metric), 0 outside `mask`."""
    batch, length = token_ids.shape
    # Only the positions in the loss are projected: padding and skipped tokens cost nothing.
    kept = mask.reshape(-1).nonzero().squeeze(-1)
    if kept.numel() == 0:
        kept = kept.new_zeros(1)  # keeps shapes valid; its weight is 0

    def flat(tensor):
        return None if tensor is None else tensor.reshape(batch * length, *tensor.shape[2:])[kept]

    total, *outputs = ChunkedSelfDistillation.apply(
        flat(student_hidden),
        student_weight,
        flat(teacher_hidden).detach(),
        teacher_weight.detach(),
        flat(token_ids),
        flat(sequence_mean_weights(mask)),
        flat(old_per_token_logps),
        flat(sampling_logps),
        settings,
    )
    per_token, student_logps, kl = (
        output.new_zeros(batch * length).index_copy_(0, kept, output).view(batch, length) for output in outputs
    )
    return total, per_token, student_logps, kl


def liger_jsd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    mask: torch.Tensor,
    alpha: float,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`full_logits` through Liger's fused linear JSD: the masked per-sequence mean, and the token mean (a metric)."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    jsd = LigerFusedLinearJSDLoss(  # soft loss only: Liger's `beta` is our `alpha` (see the module docstring)
        weight_hard_loss=0.0,
        weight_soft_loss=1.0,
        beta=alpha,
        temperature=temperature,
        compiled=student_hidden.is_cuda,
        chunk_size=chunk_size,
    )
    total = student_hidden.new_zeros((), dtype=torch.float32)
    token_sum = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
    for row in range(mask.size(0)):
        keep = mask[row].bool()
        count = int(keep.sum())
        if count == 0:
            continue
        hidden = student_hidden[row][keep]
        labels = torch.zeros(count, dtype=torch.long, device=hidden.device)  # only the (unused) hard loss reads them
        sequence_loss = jsd(hidden, student_weight, teacher_hidden[row][keep].detach(), teacher_weight.detach(), labels)
        total = total + sequence_loss
        token_sum += sequence_loss.detach() * count
    if not mask.any():  # a zero that still reaches the head and the hidden states (every process gets gradients)
        labels = torch.zeros(1, dtype=torch.long, device=student_hidden.device)
        total = jsd(
            student_hidden[0, :1], student_weight, teacher_hidden[0, :1].detach(), teacher_weight.detach(), labels
        )
        total = total * 0.0
    return total / mask.size(0), token_sum / mask.sum().clamp(min=1)


def hidden_states_loss(
    settings: LossSettings,
    student: HiddenStates,
    teacher: HiddenStates,
    token_ids: torch.Tensor,
    mask: torch.Tensor,
    old_per_token_logps: torch.Tensor | None = None,
    sampling_logps: torch.Tensor | None = None,
) -> LossOutput:
    """`chunked_loss` with the trainer's metrics."""
    loss, per_token, student_logps, kl = chunked_loss(
        *student, *teacher, token_ids, mask, settings, old_per_token_logps, sampling_logps
    )
    metrics = {
        "distillation_loss": losses.token_mean(per_token, mask),
        "teacher_student_kl": losses.token_mean(kl, mask),
        **importance.metrics(settings.importance, student_logps, mask, old_per_token_logps, sampling_logps),
    }
    return LossOutput(loss, metrics)


def liger_loss(
    settings: LossSettings,
    student: HiddenStates,
    teacher: HiddenStates,
    token_ids: torch.Tensor,
    mask: torch.Tensor,
    old_per_token_logps: torch.Tensor | None = None,
    sampling_logps: torch.Tensor | None = None,
) -> LossOutput:
    """`liger_jsd_loss` with the trainer's metrics. Importance weights cannot enter Liger's kernel: the config refuses
    runs that would need them (`SDFTConfig._check_loss_path`)."""
    loss, token_mean = liger_jsd_loss(
        *student, *teacher, mask, settings.alpha, settings.temperature, chunk_size=settings.chunk_size
    )
    return LossOutput(loss, {"distillation_loss": token_mean})


def loss_function(settings: LossSettings):
    """The loss for the run's path: `fn(settings, student, teacher, token_ids, mask, old_per_token_logps,
    sampling_logps)`."""
    if not settings.chunk_size:
        return losses.logits_loss
    return liger_loss if settings.use_liger else hidden_states_loss


def _hidden_states_problem(model, forward_params: set[str]) -> str | None:
    """Why logits recomputed as `hidden @ lm_head.weight.T` would not be what `model` outputs; None if they would."""
    config = model.config.get_text_config()
    for name, neutral in (("logit_scale", 1.0), ("final_logit_softcapping", None), ("logits_scaling", 1.0)):
        value = getattr(config, name, neutral)
        if value is not None and value != neutral:
            return f"this model transforms its logits ({name}={value})"
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or hasattr(head, "base_layer") or head.bias is not None:
        return (
            f"it needs a plain bias-free linear lm_head (got {type(head).__name__}; a LoRA adapter or "
            "`modules_to_save` on the lm_head is not supported there)"
        )
    if "logits_to_keep" not in forward_params:
        return "the model's forward has no `logits_to_keep`, so it would compute the full logits anyway"
    return None


def packing_problem(model, forward_params: set[str], fsdp_logits: bool = False) -> str | None:
    """Why padding-free forwards (`packing.py`) cannot serve `model`; None if they can. Packed, the logits come from
    the LM head applied to the completion positions' hidden states, so the head must be plain, as for the chunked
    loss. `fsdp_logits`: the run is sharded by FSDP and on the logits path, where a student head applied after the
    forward crashes FSDP2's backward (a segfault on CPU, torch 2.13); the chunked loss has no such problem."""
    if "position_ids" not in forward_params:
        return "the model's forward takes no `position_ids`"
    if fsdp_logits:
        return "under FSDP the logits path computes the logits inside the forward (`loss_chunk_size=0`)"
    return _hidden_states_problem(unwrap(model), forward_params)


def resolve_chunk_size(
    model, requested_chunk_size: int | None, use_liger: bool, teacher_on_server: bool, forward_params: set[str]
) -> int:
    """Tokens per chunk of the loss from hidden states, or 0 for the logits path.

    `requested_chunk_size` is `loss_chunk_size` (None: automatic, 0: the logits path), `use_liger` `use_liger_kernel`,
    `teacher_on_server` `use_teacher_server` (a server-scored teacher has no hidden states: the logits path). Models
    where the hidden-state loss would not equal the logits path are refused when the user asked for it
    (`loss_chunk_size` >= 1 or `use_liger_kernel`), and fall back to the logits path by default."""
    requested = use_liger or bool(requested_chunk_size)
    if teacher_on_server or requested_chunk_size == 0 and not use_liger:
        return 0
    problem = _hidden_states_problem(unwrap(model), forward_params)
    if problem is not None:
        path = "`use_liger_kernel`" if use_liger else "`loss_chunk_size`"
        if requested:
            raise ValueError(f"{path} recomputes logits from hidden states, but {problem}. Turn {path} off.")
        logger.info(f"Loss on the logits path: {problem}.")
        return 0
    return requested_chunk_size or DEFAULT_LOSS_CHUNK_SIZE
