"""SDFT divergences on logits. Pure functions: tensors in, tensors out, no model and no trainer state.

`per_token_loss` is the one place where the distillation mode is chosen and the importance weights (`importance.py`)
applied; the logits path (`logits_loss`) and the chunked path (`chunked_loss.py`, per chunk) both call it. `LossSettings`
holds the loss options, built once from the config (`settings.loss_settings`), and checks them.

Shapes: logits `[B, T, V]`, per-token values `[B, T]`. `alpha` follows TRL: 0 is forward KL(teacher || student),
1 is reverse KL(student || teacher), and values in between give the generalised Jensen-Shannon divergence
`alpha * KL(teacher || M) + (1 - alpha) * KL(student || M)` with `M = (1 - alpha) * student + alpha * teacher`.
"""

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from trl.trainer.utils import selective_log_softmax

from . import importance
from .importance import ImportanceSettings


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
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    k: int,
    add_tail: bool,
    support: str = "student",
    student_norm: torch.Tensor | None = None,
    teacher_norm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probs on a top-k support: renormalised, or with a tail bucket. The log-normalizers
    (`log_normalizer`) are computed here unless given."""
    index, keep = topk_support(student_logits, teacher_logits, k, support)
    student_norm = log_normalizer(student_logits) if student_norm is None else student_norm
    teacher_norm = log_normalizer(teacher_logits) if teacher_norm is None else teacher_norm
    student = student_logits.gather(-1, index) - student_norm
    teacher = teacher_logits.gather(-1, index) - teacher_norm
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
    student_norm: torch.Tensor | None = None,
    teacher_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    student, teacher = topk_support_log_probs(
        student_logits, teacher_logits, k, add_tail, support, student_norm, teacher_norm
    )
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
    student = student_logits.gather(-1, teacher_topk_ids) - log_normalizer(student_logits)
    absent = ~torch.isfinite(teacher_topk_log_probs)
    student = student.masked_fill(absent, _ABSENT)
    teacher = teacher_topk_log_probs.masked_fill(absent, _ABSENT)
    if add_tail:
        return generalized_jsd(with_tail_bucket(student), with_tail_bucket(teacher), alpha)
    return generalized_jsd(renormalize(student), renormalize(teacher), alpha)


def sampled_token_loss(student_token_logps: torch.Tensor, teacher_token_logps: torch.Tensor) -> torch.Tensor:
    """Reverse-KL estimator on the sampled tokens: its gradient is `(log s - log t) * grad log s` (REINFORCE)."""
    return (student_token_logps - teacher_token_logps).detach() * student_token_logps


def token_log_probs(logits: torch.Tensor, token_ids: torch.Tensor, log_normalizer: torch.Tensor | None = None):
    """Log-probabilities of `token_ids` under `logits`: from `log_normalizer` (`logsumexp(logits, -1, keepdim=True)`)
    when the caller has it, else by TRL's memory-lean selective log-softmax."""
    if log_normalizer is None:
        return selective_log_softmax(logits, token_ids)
    return (logits.gather(-1, token_ids.unsqueeze(-1)) - log_normalizer).squeeze(-1)


def log_normalizer(logits: torch.Tensor) -> torch.Tensor:
    """`logsumexp` over the vocabulary, keeping the dimension: `logits - log_normalizer(logits)` are log-probs."""
    return torch.logsumexp(logits, dim=-1, keepdim=True)


@torch.no_grad()
def kl_from_logits(teacher_logits, student_logits, teacher_norm, student_norm) -> torch.Tensor:
    """Full-vocabulary KL(teacher || student) per position from logits and their log-normalizers (a metric):
    `sum_v p_t(v) (t_v - s_v) - logZ_t + logZ_s`, two passes over the vocabulary instead of two log-softmaxes."""
    weights = (teacher_logits - teacher_norm).exp_()
    return (weights.mul_(teacher_logits - student_logits)).sum(-1) - (teacher_norm - student_norm).squeeze(-1)


def loss_mask(
    completion_mask: torch.Tensor, num_tokens_to_skip: int, tool_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The completion positions the loss reads: the model's own tokens (`tool_mask`, in multi-turn rollouts: 0 on tool
    results and the template's turn headers) without the trajectory's first `num_tokens_to_skip` of them."""
    mask = completion_mask if tool_mask is None else completion_mask * tool_mask.to(completion_mask.dtype)
    if num_tokens_to_skip <= 0:
        return mask
    return mask * (mask.cumsum(-1) > num_tokens_to_skip).to(mask.dtype)


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


DISTILLATION_MODES = ("sampled_token", "full_logits", "topk_logits")


@dataclass(frozen=True)
class LossSettings:
    """The loss options of one run (`SDFTConfig`'s `distillation_*` fields, `temperature`, the loss path).

    `chunk_size` 0 is the logits path; otherwise the loss is computed from hidden states in chunks of that many tokens
    (`chunked_loss.py`), through Liger's fused JSD when `use_liger` is set.
    """

    mode: str
    alpha: float
    topk: int | None = None
    add_tail: bool = False
    support: str = "student"
    temperature: float = 1.0
    chunk_size: int = 0
    use_liger: bool = False
    importance: ImportanceSettings = ImportanceSettings()  # the importance weights (`importance.py`); default: none

    def __post_init__(self):
        if self.mode not in DISTILLATION_MODES:
            raise ValueError(
                f"Unknown distillation mode {self.mode!r}: use one of {', '.join(map(repr, DISTILLATION_MODES))}."
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"`distillation_alpha={self.alpha}` must be in [0, 1] (0 forward KL, 1 reverse KL).")
        if self.mode == "sampled_token" and self.alpha != 1.0:
            raise ValueError(
                f"`distillation_mode='sampled_token'` estimates reverse KL only, so it needs `distillation_alpha=1.0` "
                f"(got {self.alpha}). Set `distillation_alpha=1.0`, or use 'topk_logits'/'full_logits'."
            )
        if self.mode == "topk_logits" and (self.topk is None or self.topk < 1):
            raise ValueError(
                f"`distillation_mode='topk_logits'` needs `distillation_topk` >= 1 (got {self.topk}). "
                "Set e.g. `distillation_topk=100`, or use `distillation_mode='full_logits'`."
            )
        if self.support not in TOPK_SUPPORTS:
            raise ValueError(f"Unknown top-k support {self.support!r}: use one of {', '.join(TOPK_SUPPORTS)}.")
        if self.use_liger and self.mode != "full_logits":
            raise ValueError(
                "`use_liger_kernel=True` computes Liger's fused JSD over the full vocabulary: set "
                f"`distillation_mode='full_logits'` (got {self.mode!r}), or use `loss_chunk_size` for a "
                "memory-lean top-k or sampled-token loss."
            )


@dataclass
class ServerTeacherScores:
    """A teacher scored on a vLLM server: its log-probs of the completion tokens `[B, T]` and of its `k` most likely
    tokens `[B, T, k]` (ids alongside). Padding positions hold -inf (log-probs) and 0 (ids)."""

    token_logps: torch.Tensor
    topk_logps: torch.Tensor
    topk_ids: torch.Tensor

    @property
    def finite_token_logps(self) -> torch.Tensor:
        """`token_logps` with 0 at padding, so that masked sums stay finite."""
        return torch.where(torch.isfinite(self.token_logps), self.token_logps, torch.zeros_like(self.token_logps))


@dataclass
class LossOutput:
    """The scalar loss to back-propagate, and detached metrics (names as logged under `self_distillation/`)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class PerToken(NamedTuple):
    """`per_token_loss`'s result, each `[...]`: the loss (with gradient), the student's log-probs of the tokens
    (detached) and, when asked for and the teacher's logits are known, the full-vocabulary KL(teacher || student)."""

    loss: torch.Tensor
    student_logps: torch.Tensor
    kl: torch.Tensor | None = None


def per_token_loss(
    settings: LossSettings,
    student_logits: torch.Tensor,
    teacher: torch.Tensor | ServerTeacherScores,
    token_ids: torch.Tensor,
    old_per_token_logps: torch.Tensor | None = None,
    sampling_logps: torch.Tensor | None = None,
    with_kl: bool = False,
) -> PerToken:
    """Per-token divergence for the configured mode, the student's log-probs of `token_ids`, and (`with_kl`) the
    `teacher_student_kl` metric per token. Each distribution's log-normalizer is computed once and shared by all three.

    `teacher` is the teacher's logits (same shape as `student_logits`) or, for a server-scored teacher, its scores.
    Importance weights (`importance.token_weights`), when given what they need: `old_per_token_logps` (the rollout
    policy's log-probs) clip the drift of reused rollouts; `sampling_logps` (the rollout engine's own log-probs) correct
    the engine's mismatch, against the old log-probs, or the current ones when on-policy.
    """
    scored = isinstance(teacher, ServerTeacherScores)
    kl_metric = None
    if settings.mode == "full_logits":
        if scored:
            raise ValueError("A server-scored teacher gives top-k log-probs only: 'full_logits' needs its logits.")
        student_log_probs, teacher_log_probs = student_logits.log_softmax(-1), teacher.log_softmax(-1)
        student_logps = student_log_probs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
        per_token = generalized_jsd(student_log_probs, teacher_log_probs, settings.alpha)
        if with_kl:
            with torch.no_grad():
                kl_metric = per_token if settings.alpha == 0.0 else kl(teacher_log_probs, student_log_probs)
    else:
        student_norm = log_normalizer(student_logits)
        teacher_norm = None if scored else log_normalizer(teacher)
        student_logps = token_log_probs(student_logits, token_ids, student_norm)
        if settings.mode == "sampled_token":
            teacher_logps = teacher.finite_token_logps if scored else token_log_probs(teacher, token_ids, teacher_norm)
            per_token = sampled_token_loss(student_logps, teacher_logps)
        elif scored:  # topk_logits on the teacher's top-k, as the server returns it
            per_token = given_teacher_topk_loss(
                student_logits, teacher.topk_logps, teacher.topk_ids, settings.alpha, settings.add_tail
            )
        else:
            per_token = topk_logits_loss(
                student_logits,
                teacher,
                settings.topk,
                settings.alpha,
                settings.add_tail,
                settings.support,
                student_norm,
                teacher_norm,
            )
        if with_kl and not scored:
            kl_metric = kl_from_logits(teacher, student_logits.detach(), teacher_norm, student_norm.detach())
    weights = importance.token_weights(settings.importance, student_logps, old_per_token_logps, sampling_logps)
    if weights is not None:
        per_token = per_token * weights
    return PerToken(per_token, student_logps.detach(), None if kl_metric is None else kl_metric.detach())


def logits_loss(
    settings: LossSettings,
    student_logits: torch.Tensor,
    teacher: torch.Tensor | ServerTeacherScores,
    token_ids: torch.Tensor,
    mask: torch.Tensor,
    old_per_token_logps: torch.Tensor | None = None,
    sampling_logps: torch.Tensor | None = None,
) -> LossOutput:
    """The SDFT loss on the batch's logits `[B, T, V]`: masked per-sequence mean of `per_token_loss`."""
    per_token, student_logps, _ = per_token_loss(
        settings, student_logits, teacher, token_ids, old_per_token_logps, sampling_logps
    )
    metrics = {"distillation_loss": token_mean(per_token.detach(), mask)}
    metrics.update(importance.metrics(settings.importance, student_logps, mask, old_per_token_logps, sampling_logps))
    if isinstance(teacher, ServerTeacherScores):
        metrics["server_logprob_abs_diff"] = token_mean((student_logps - teacher.finite_token_logps).abs(), mask)
    else:
        metrics["teacher_student_kl"] = teacher_student_kl(student_logits, teacher, mask)
    return LossOutput(sequence_mean(per_token, mask), metrics)
