"""TRL's `trl.experimental.sdft.loss_utils` names, as thin wrappers over `trl_sdft.losses`.

They exist so that `from trl.experimental.sdft.loss_utils import X` becomes `from trl_sdft.loss_utils import X`: the
same names, signatures, meaning and shapes (logits `[..., V]`, per-position results `[...]`). `alpha` follows TRL: 0 is
forward KL(teacher || student), 1 reverse KL(student || teacher), in between the generalised Jensen-Shannon divergence.
"""

import torch

from .importance import ratio
from .losses import LossSettings, generalized_jsd, per_token_loss, topk_logits_loss, with_tail_bucket

__all__ = [
    "add_tail_bucket",
    "apply_importance_sampling_clipping",
    "compute_divergence",
    "compute_full_logit_self_distillation_loss",
    "compute_sampled_token_self_distillation_loss",
    "compute_topk_self_distillation_loss",
]


def compute_divergence(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """Divergence between two distributions given as log-probabilities, summed over the last dimension."""
    return generalized_jsd(student_log_probs, teacher_log_probs, alpha)


def add_tail_bucket(log_probs: torch.Tensor) -> torch.Tensor:
    """Append one category holding the mass (`1 - sum(exp(log_probs))`) that a top-k support leaves out."""
    return with_tail_bucket(log_probs)


def apply_importance_sampling_clipping(
    per_token_loss: torch.Tensor,
    student_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    clip_coeff: float,
) -> torch.Tensor:
    """`per_token_loss` times the detached ratio `exp(student - old)`, capped at `clip_coeff`."""
    return per_token_loss * ratio(student_log_probs, old_log_probs).clamp(max=clip_coeff)


def compute_topk_self_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    distillation_topk: int,
    distillation_alpha: float,
    distillation_add_tail: bool,
) -> torch.Tensor:
    """Divergence on the student's top-k tokens, renormalised or with a tail bucket (`distillation_add_tail`)."""
    return topk_logits_loss(
        student_logits, teacher_logits, distillation_topk, distillation_alpha, distillation_add_tail, support="student"
    )


def compute_full_logit_self_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    distillation_alpha: float,
) -> torch.Tensor:
    """Divergence over the full vocabulary."""
    return generalized_jsd(student_logits.log_softmax(-1), teacher_logits.log_softmax(-1), distillation_alpha)


def compute_sampled_token_self_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    completion_ids: torch.Tensor,
    *,
    distillation_alpha: float,
) -> torch.Tensor:
    """Reverse-KL estimator on the sampled tokens `completion_ids`; any `distillation_alpha` but 1.0 is a ValueError."""
    settings = LossSettings(mode="sampled_token", alpha=distillation_alpha)  # checks alpha == 1.0
    return per_token_loss(settings, student_logits, teacher_logits, completion_ids).loss
