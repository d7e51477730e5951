"""SFT + top-K knowledge distillation on stored teacher logits (pure tensor functions).

Positions are logit positions: position p predicts token p + 1. `kd_mask[b, p]` marks positions with stored teacher
top-K (indices into the vocabulary, and the teacher's logits there).
"""

import torch
import torch.nn.functional as F

from ..losses import sequence_mean, token_mean


def topk_kl(student_logits, teacher_indices, teacher_values):
    """KL(teacher || student) per position, over the teacher's top-K.

    The teacher distribution is the softmax of its K stored logits; the student's is its full-vocabulary log-softmax
    gathered at those K indices (the student's mass outside them is not renormalised away, so a student that puts
    mass elsewhere pays for it). Shapes: [..., V], [..., K], [..., K] -> [...].
    """
    teacher_logp = F.log_softmax(teacher_values.float(), dim=-1)
    student_logp = F.log_softmax(student_logits.float(), dim=-1).gather(-1, teacher_indices.long())
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)


def teacher_agreement(teacher_indices, teacher_values, targets):
    """The teacher's probability of the hard target token (0 where it is outside the teacher's top-K)."""
    probs = F.softmax(teacher_values.float(), dim=-1)
    hit = teacher_indices.long() == targets.long().unsqueeze(-1)
    return (probs * hit).sum(-1)


def _reduce(values, mask, per_token: bool):
    """Mean over masked positions: over all tokens of the batch, or per sequence and then over sequences (SDFT's
    aggregation, `losses.sequence_mean`: a sequence without positions counts as 0, as in TRL)."""
    return token_mean(values, mask) if per_token else sequence_mean(values, mask)


def sft_kd_loss(
    logits,
    labels,
    teacher_indices,
    teacher_values,
    kd_mask,
    loss_multi: float = 1.0,
    per_token: bool = True,
    adaptive: bool = False,
):
    """`SFT + loss_multi * KD` and its parts.

    logits [B, T, V]; labels [B, T] (-100 = no SFT loss), aligned with the input ids; teacher_* [B, T, K] and kd_mask
    [B, T] at logit positions. `adaptive` weights each position's KL by the teacher's probability of the hard target,
    so the teacher is trusted where it agrees with the demonstration.
    """
    shifted_labels = torch.full_like(labels, -100)
    shifted_labels[:, :-1] = labels[:, 1:]
    sft_mask = shifted_labels != -100
    token_ce = F.cross_entropy(
        logits.float().flatten(0, 1), shifted_labels.clamp(min=0).flatten(), reduction="none"
    ).view_as(labels)
    sft = _reduce(token_ce, sft_mask, per_token)
    kl = topk_kl(logits, teacher_indices, teacher_values)
    weights = torch.ones_like(kl)
    if adaptive:
        weights = teacher_agreement(teacher_indices, teacher_values, shifted_labels.clamp(min=0)).detach()
    kd = _reduce(kl * weights, kd_mask, per_token)
    return sft + loss_multi * kd, {
        "sft_loss": sft.detach(),
        "kd_loss": kd.detach(),
        "kd_weight": _reduce(weights, kd_mask, True).detach(),
    }
