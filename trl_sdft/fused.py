"""SDFT losses from hidden states and LM-head weights, without `[tokens, vocab]` logits for the whole batch.

Three paths, chosen by `trainer.py` (`loss_chunk_size`, `use_liger_kernel`):

- `chunked_loss`: every distillation mode (`topk_logits` with any support and tail, `full_logits`, `sampled_token`),
  token chunks of `chunk_size`. Each chunk's logits are projected, reduced to its loss and turned into gradients for
  the hidden states and the LM head right away (inside the forward, as Liger does), then freed: the extra memory is
  one chunk's logits and their gradient, O(chunk x vocab), and the matmuls are as many as the unfused path's.
  The per-token weights (the masked per-sequence mean, importance-sampling clipping) are applied inside, so the
  result is the same scalar loss as `losses.sequence_mean(...)` of the unfused path.
- `liger_jsd_loss`: Liger's fused linear JSD (`liger_kernel.chunked_loss`), `full_logits` only, once per sequence so
  that its token mean becomes our per-sequence mean. Liger's `beta` is our `distillation_alpha` (checked numerically
  by the tests: beta 0 is KL(teacher || student), 1 is KL(student || teacher), mixture `(1-beta) s + beta t`).

Pure functions of tensors; the math per chunk is `losses.py`'s.
"""

from dataclasses import dataclass

import torch

from . import losses


@dataclass(frozen=True)
class LossSpec:
    mode: str
    alpha: float
    topk: int | None = None
    add_tail: bool = False
    support: str = "student"
    temperature: float = 1.0
    is_clip: float | None = None
    chunk_size: int = 1024


def project(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """Float32 logits of `hidden @ weight.T`, divided by the sampling temperature (as the unfused path does)."""
    return (hidden @ weight.t()).float() / temperature


def _chunk_loss(student_logits, teacher_logits, token_ids, token_weights, rollout_logps, spec: LossSpec):
    """Weighted loss sum of one chunk, its per-token losses and the student's token log-probs."""
    student_logps = losses.token_log_probs(student_logits, token_ids)
    if spec.mode == "topk_logits":
        per_token = losses.topk_logits_loss(
            student_logits, teacher_logits, spec.topk, spec.alpha, spec.add_tail, spec.support
        )
    elif spec.mode == "full_logits":
        per_token = losses.full_logits_loss(student_logits, teacher_logits, spec.alpha)
    elif spec.mode == "sampled_token":
        per_token = losses.sampled_token_loss(student_logps, losses.token_log_probs(teacher_logits, token_ids))
    else:
        raise ValueError(f"Unknown distillation mode {spec.mode!r}.")
    if spec.is_clip is not None and rollout_logps is not None:
        per_token = losses.clip_importance_weights(per_token, student_logps, rollout_logps, spec.is_clip)
    with torch.no_grad():  # the `teacher_student_kl` metric: full-vocabulary KL(teacher || student) per token
        kl = losses.kl(teacher_logits.log_softmax(-1), student_logits.detach().log_softmax(-1))
    return (per_token * token_weights).sum(), per_token.detach(), student_logps.detach(), kl


class ChunkedSelfDistillation(torch.autograd.Function):
    """Loss `sum_i w_i * loss_i` over tokens `i`, in chunks; gradients for the student's hidden states and weight."""

    @staticmethod
    def forward(
        ctx,
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        token_ids,
        token_weights,
        rollout_logps,
        spec,
    ):
        grad_hidden = torch.empty_like(student_hidden)
        grad_weight = torch.zeros(student_weight.shape, dtype=torch.float32, device=student_weight.device)
        total = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
        per_token, student_logps, kls = [], [], []
        for start in range(0, student_hidden.size(0), spec.chunk_size):
            rows = slice(start, start + spec.chunk_size)
            hidden = student_hidden[rows]
            with torch.enable_grad():
                # The gradient is taken w.r.t. the chunk's logits only; the two matmuls that carry it to the hidden
                # states and the weight are done by hand, accumulating in place (no weight-sized temporaries).
                raw = (hidden @ student_weight.t()).float().requires_grad_(True)
                with torch.no_grad():
                    teacher_logits = project(teacher_hidden[rows], teacher_weight, spec.temperature)
                chunk_total, chunk_losses, chunk_logps, chunk_kl = _chunk_loss(
                    raw / spec.temperature,
                    teacher_logits,
                    token_ids[rows],
                    token_weights[rows],
                    None if rollout_logps is None else rollout_logps[rows],
                    spec,
                )
                del teacher_logits
                (grad_raw,) = torch.autograd.grad(chunk_total, raw)
            del raw
            grad_hidden[rows] = (grad_raw.to(student_weight.dtype) @ student_weight).to(grad_hidden.dtype)
            grad_weight.addmm_(grad_raw.t(), hidden.float())
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
        return grad_hidden, grad_weight, None, None, None, None, None, None


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
    spec: LossSpec,
    rollout_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The masked per-sequence mean loss from `[B, T, H]` hidden states (positions predicting `token_ids` `[B, T]`).

    Returns the scalar loss and, detached, `[B, T]`: the per-token losses, the student's token log-probs and the
    full-vocabulary KL(teacher || student) (the `teacher_student_kl` metric)."""
    batch, length = token_ids.shape
    flat = lambda tensor: None if tensor is None else tensor.reshape(batch * length, *tensor.shape[2:])  # noqa: E731
    total, per_token, student_logps, kl = ChunkedSelfDistillation.apply(
        flat(student_hidden),
        student_weight,
        flat(teacher_hidden).detach(),
        teacher_weight.detach(),
        flat(token_ids),
        flat(sequence_mean_weights(mask)),
        flat(rollout_logps),
        spec,
    )
    return total, per_token.view(batch, length), student_logps.view(batch, length), kl.view(batch, length)


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
    from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDFunction

    compiled = student_hidden.is_cuda
    total = student_hidden.new_zeros((), dtype=torch.float32)
    token_sum = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
    for row in range(mask.size(0)):
        keep = mask[row].bool()
        count = int(keep.sum())
        if count == 0:
            continue
        hidden = student_hidden[row][keep]
        sequence_loss = LigerFusedLinearJSDFunction.apply(
            hidden,
            student_weight,
            teacher_hidden[row][keep].detach(),
            teacher_weight.detach(),
            torch.zeros(
                count, dtype=torch.long, device=hidden.device
            ),  # labels: only the (unused) hard loss reads them
            None,
            None,
            0.0,  # weight_hard_loss
            1.0,  # weight_soft_loss
            alpha,  # beta
            -100,
            temperature,
            compiled,
            chunk_size,
        )
        total = total + sequence_loss
        token_sum += sequence_loss.detach() * count
    return total / mask.size(0), token_sum / mask.sum().clamp(min=1)
