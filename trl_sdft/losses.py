"""SDFT divergences on logits. Pure functions: tensors in, tensors out, no model and no trainer state.

Shapes: logits `[B, T, V]`, per-token values `[B, T]`. `alpha` follows TRL: 0 is forward KL(teacher || student),
1 is reverse KL(student || teacher), and values in between give the generalised Jensen-Shannon divergence
`alpha * KL(teacher || M) + (1 - alpha) * KL(student || M)` with `M = (1 - alpha) * student + alpha * teacher`.
"""

import math

import torch
from trl.trainer.utils import selective_log_softmax


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def generalized_jsd(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-position divergence between two distributions given as log-probabilities over the last dimension."""
    if alpha == 0.0:
        return kl(teacher_log_probs, student_log_probs)
    if alpha == 1.0:
        return kl(student_log_probs, teacher_log_probs)
    log_mixture = torch.logaddexp(student_log_probs + math.log(1.0 - alpha), teacher_log_probs + math.log(alpha))
    return alpha * kl(teacher_log_probs, log_mixture) + (1.0 - alpha) * kl(student_log_probs, log_mixture)


def with_tail_bucket(log_probs: torch.Tensor) -> torch.Tensor:
    """Append one category holding the mass that `log_probs` (a subset of a distribution) leaves out."""
    captured = torch.logsumexp(log_probs, dim=-1, keepdim=True).clamp(max=-1e-7)
    tail = torch.log(-torch.expm1(captured))
    return torch.cat([log_probs, tail], dim=-1)


def renormalize(log_probs: torch.Tensor) -> torch.Tensor:
    return log_probs - torch.logsumexp(log_probs, dim=-1, keepdim=True)


TOPK_SUPPORTS = ("student", "teacher", "union")
# Log-probability given to a duplicate entry of the union support: exp() of it is exactly 0 in every float dtype, so it
# adds no mass and no divergence, and unlike -inf it keeps gradients finite.
_ABSENT = -1.0e4


def topk_support(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, support: str = "student"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token indices of the top-k support and, for `union`, which of them to keep (the teacher's duplicates are not).

    `student`: the student's top-k (TRL's choice). `teacher`: the teacher's top-k, so tokens the student does not yet
    propose can still be taught. `union`: both, `2k` slots with the teacher's duplicates masked out.
    """
    k = min(k, student_logits.size(-1))
    if support == "student":
        return student_logits.topk(k, dim=-1).indices, None
    if support == "teacher":
        return teacher_logits.topk(k, dim=-1).indices, None
    if support != "union":
        raise ValueError(f"Unknown top-k support {support!r}: use one of {', '.join(TOPK_SUPPORTS)}.")
    student_index = student_logits.topk(k, dim=-1).indices
    teacher_index = teacher_logits.topk(k, dim=-1).indices
    duplicate = (teacher_index.unsqueeze(-1) == student_index.unsqueeze(-2)).any(-1)
    keep = torch.cat([torch.ones_like(duplicate), ~duplicate], dim=-1)
    return torch.cat([student_index, teacher_index], dim=-1), keep


def topk_support_log_probs(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, add_tail: bool, support: str = "student"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probs on a top-k support: renormalised, or with a tail bucket."""
    index, keep = topk_support(student_logits, teacher_logits, k, support)
    student = student_logits.gather(-1, index) - torch.logsumexp(student_logits, dim=-1, keepdim=True)
    teacher = teacher_logits.gather(-1, index) - torch.logsumexp(teacher_logits, dim=-1, keepdim=True)
    if keep is not None:
        student = student.masked_fill(~keep, _ABSENT)
        teacher = teacher.masked_fill(~keep, _ABSENT)
    if add_tail:
        return with_tail_bucket(student), with_tail_bucket(teacher)
    return renormalize(student), renormalize(teacher)


def topk_logits_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    k: int,
    alpha: float,
    add_tail: bool = False,
    support: str = "student",
) -> torch.Tensor:
    student, teacher = topk_support_log_probs(student_logits, teacher_logits, k, add_tail, support)
    return generalized_jsd(student, teacher, alpha)


def given_teacher_topk_loss(
    student_logits: torch.Tensor,
    teacher_topk_log_probs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    alpha: float,
    add_tail: bool = False,
) -> torch.Tensor:
    """`topk_logits` on the teacher's support when only the teacher's top-k log-probs are known (a vLLM server).

    `teacher_topk_log_probs` are full-vocabulary log-probs of the tokens `teacher_topk_ids`; entries that are not finite
    (a server that returned fewer than k) are left out of the support. Equals `topk_logits_loss(..., support="teacher")`
    computed from the teacher's full logits.
    """
    student = student_logits.gather(-1, teacher_topk_ids) - torch.logsumexp(student_logits, dim=-1, keepdim=True)
    absent = ~torch.isfinite(teacher_topk_log_probs)
    student = student.masked_fill(absent, _ABSENT)
    teacher = teacher_topk_log_probs.masked_fill(absent, _ABSENT)
    if add_tail:
        return generalized_jsd(with_tail_bucket(student), with_tail_bucket(teacher), alpha)
    return generalized_jsd(renormalize(student), renormalize(teacher), alpha)


def full_logits_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    return generalized_jsd(student_logits.log_softmax(-1), teacher_logits.log_softmax(-1), alpha)


def sampled_token_loss(student_token_logps: torch.Tensor, teacher_token_logps: torch.Tensor) -> torch.Tensor:
    """Reverse-KL estimator on the sampled tokens: its gradient is `(log s - log t) * grad log s` (REINFORCE)."""
    return (student_token_logps - teacher_token_logps).detach() * student_token_logps


def token_log_probs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of `token_ids` under `logits` (TRL's memory-lean selective log-softmax)."""
    return selective_log_softmax(logits, token_ids)


def clip_importance_weights(
    per_token_loss: torch.Tensor, student_logps: torch.Tensor, rollout_logps: torch.Tensor, clip: float
) -> torch.Tensor:
    """Weight each token by the (detached, capped) ratio of the current student to the policy that sampled it."""
    log_ratio = (student_logps - rollout_logps).detach().clamp(-20.0, 20.0)
    return per_token_loss * log_ratio.exp().clamp(max=clip)


def loss_mask(completion_mask: torch.Tensor, num_tokens_to_skip: int) -> torch.Tensor:
    """The completion mask without its first `num_tokens_to_skip` positions."""
    if num_tokens_to_skip <= 0:
        return completion_mask
    positions = torch.arange(completion_mask.size(1), device=completion_mask.device)
    return completion_mask * (positions >= num_tokens_to_skip).to(completion_mask.dtype)


def sequence_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of each sequence's mean over its unmasked tokens (the SDFT/GRPO aggregation)."""
    mask = mask.to(per_token.dtype)
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over all unmasked tokens of the batch."""
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


@torch.no_grad()
def teacher_student_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, chunk: int = 64
) -> torch.Tensor:
    """Mean per-token KL(teacher || student) over the full vocabulary, in chunks of positions (a metric)."""
    total = student_logits.new_zeros((), dtype=torch.float32)
    for row in range(student_logits.size(0)):
        for start in range(0, student_logits.size(1), chunk):
            part = slice(start, start + chunk)
            per_pos = kl(
                teacher_logits[row, part].float().log_softmax(-1), student_logits[row, part].float().log_softmax(-1)
            )
            total = total + (per_pos * mask[row, part].float()).sum()
    return total / mask.float().sum().clamp(min=1.0)


def distillation_loss(
    mode: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    completion_ids: torch.Tensor,
    *,
    alpha: float,
    topk: int | None = None,
    add_tail: bool = False,
    topk_support: str = "student",
) -> torch.Tensor:
    """Per-token divergence `[B, T]` for a distillation mode."""
    if mode == "topk_logits":
        return topk_logits_loss(student_logits, teacher_logits, topk, alpha, add_tail, topk_support)
    if mode == "full_logits":
        return full_logits_loss(student_logits, teacher_logits, alpha)
    if mode == "sampled_token":
        if alpha != 1.0:
            raise ValueError(f"'sampled_token' is a reverse-KL estimator: it needs alpha=1.0, got {alpha}.")
        return sampled_token_loss(
            token_log_probs(student_logits, completion_ids), token_log_probs(teacher_logits, completion_ids)
        )
    raise ValueError(f"Unknown distillation mode {mode!r}: use 'topk_logits', 'full_logits' or 'sampled_token'.")
