"""Our pure loss functions against trl.experimental.sdft.loss_utils (used here as an oracle only)."""

import pytest
import torch
from trl.experimental.sdft import loss_utils as peer

from trl_sdft import losses

ALPHAS = [0.0, 0.3, 0.5, 1.0]


def logits(seed, shape=(3, 5, 50), scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).double()


def both(fn_ours, fn_peer, seed=0):
    """Values and gradients (w.r.t. student logits) of both implementations on the same tensors."""
    results = []
    for fn in (fn_ours, fn_peer):
        student = logits(seed).requires_grad_(True)
        teacher = logits(seed + 1)
        out = fn(student, teacher)
        weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
        (out * weights).sum().backward()
        results.append((out.detach(), student.grad))
    return results


@pytest.mark.parametrize("alpha", ALPHAS)
def test_full_logits_matches_peer(alpha):
    (ours, g_ours), (theirs, g_theirs) = both(
        lambda s, t: losses.full_logits_loss(s, t, alpha),
        lambda s, t: peer.compute_full_logit_self_distillation_loss(s, t, distillation_alpha=alpha),
    )
    assert ours.shape == (3, 5)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("k", [1, 7, 50])
def test_topk_matches_peer(alpha, tail, k):
    (ours, g_ours), (theirs, g_theirs) = both(
        lambda s, t: losses.topk_logits_loss(s, t, k, alpha, tail),
        lambda s, t: peer.compute_topk_self_distillation_loss(
            s, t, distillation_topk=k, distillation_alpha=alpha, distillation_add_tail=tail
        ),
    )
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-6, rtol=0)


def test_sampled_token_matches_peer():
    ids = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(3))
    (ours, g_ours), (theirs, g_theirs) = both(
        lambda s, t: losses.per_token_loss(losses.LossSettings("sampled_token", alpha=1.0), s, t, ids)[0],
        lambda s, t: peer.compute_sampled_token_self_distillation_loss(s, t, ids, distillation_alpha=1.0),
    )
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-6, rtol=0)


def test_tail_bucket_and_clipping_match_peer():
    log_probs = logits(5).log_softmax(-1)[..., :10]
    torch.testing.assert_close(losses.with_tail_bucket(log_probs), peer.add_tail_bucket(log_probs))
    assert torch.allclose(losses.with_tail_bucket(log_probs).logsumexp(-1), torch.zeros(3, 5, dtype=torch.double))
    per_token, student, old = logits(6)[..., 0].abs(), logits(7)[..., 0], logits(8)[..., 0]
    ours = losses.clip_importance_weights(per_token, student, old, 2.0)
    torch.testing.assert_close(ours, peer.apply_importance_sampling_clipping(per_token, student, old, 2.0))
    assert (ours <= 2.0 * per_token + 1e-12).all()


def test_divergence_edge_cases():
    p = logits(9).log_softmax(-1)
    # identical distributions: zero for every alpha
    for alpha in ALPHAS:
        assert losses.generalized_jsd(p, p, alpha).abs().max() < 1e-10
    q = logits(10).log_softmax(-1)
    # alpha = 0 is KL(teacher || student), alpha = 1 is KL(student || teacher)
    torch.testing.assert_close(losses.generalized_jsd(p, q, 0.0), (q.exp() * (q - p)).sum(-1))
    torch.testing.assert_close(losses.generalized_jsd(p, q, 1.0), (p.exp() * (p - q)).sum(-1))
    # JSD is bounded by log 2 at alpha = 0.5
    assert (losses.generalized_jsd(p, q, 0.5) <= torch.log(torch.tensor(2.0)) + 1e-9).all()


def test_masks_and_means():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert losses.loss_mask(mask, 1).tolist() == [[0, 1, 1, 0], [0, 1, 0, 0]]
    assert losses.loss_mask(mask, 0) is mask
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 6.0, 100.0, 100.0]])
    assert losses.sequence_mean(values, mask).item() == pytest.approx((2.0 + 5.0) / 2)
    assert losses.token_mean(values, mask).item() == pytest.approx(16.0 / 5)


def test_teacher_student_kl_metric():
    s, t = logits(11).float(), logits(12).float()
    mask = torch.ones(3, 5)
    mask[0, 3:] = 0
    expected = losses.kl(t.log_softmax(-1), s.log_softmax(-1))
    expected = (expected * mask).sum() / mask.sum()
    torch.testing.assert_close(losses.teacher_student_kl(s, t, mask, chunk=2), expected)


def test_unknown_mode_and_bad_alpha_raise():
    s = logits(0)
    ids = torch.zeros(3, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="Unknown distillation mode"):
        losses.per_token_loss(losses.LossSettings("nope", alpha=0.5), s, s, ids)
    with pytest.raises(ValueError, match="alpha=1.0"):
        losses.per_token_loss(losses.LossSettings("sampled_token", alpha=0.5), s, s, ids)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("tail", [False, True])
def test_teacher_support_is_the_peer_with_roles_swapped(alpha, tail):
    """On the teacher's top-k, JSD_alpha(student, teacher) = the peer's JSD_(1-alpha) with the roles swapped."""
    student, teacher = logits(20), logits(21)
    ours = losses.topk_logits_loss(student, teacher, 7, alpha, tail, support="teacher")
    swapped = peer.compute_topk_self_distillation_loss(
        teacher, student, distillation_topk=7, distillation_alpha=1.0 - alpha, distillation_add_tail=tail
    )
    torch.testing.assert_close(ours, swapped, atol=1e-6, rtol=0)


def brute_force_union(student, teacher, k, alpha, tail):
    """Per position: the set union of both top-k, log-probs gathered there, then the divergence."""
    out = torch.zeros(student.shape[:-1], dtype=student.dtype)
    for b in range(student.size(0)):
        for t in range(student.size(1)):
            s, te = student[b, t], teacher[b, t]
            index = torch.tensor(sorted(set(s.topk(k).indices.tolist()) | set(te.topk(k).indices.tolist())))
            ls, lt = s.log_softmax(-1)[index], te.log_softmax(-1)[index]
            if tail:
                ls, lt = losses.with_tail_bucket(ls), losses.with_tail_bucket(lt)
            else:
                ls, lt = losses.renormalize(ls), losses.renormalize(lt)
            out[b, t] = losses.generalized_jsd(ls, lt, alpha)
    return out


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("tail", [False, True])
def test_union_support_matches_brute_force(alpha, tail):
    student = logits(22).requires_grad_(True)
    teacher = logits(23)
    ours = losses.topk_logits_loss(student, teacher, 6, alpha, tail, support="union")
    torch.testing.assert_close(ours, brute_force_union(student.detach(), teacher, 6, alpha, tail), atol=1e-6, rtol=0)
    ours.sum().backward()
    assert torch.isfinite(student.grad).all()


def test_union_equals_student_support_when_the_top_k_agree():
    student = logits(24)
    teacher = student * 2.0  # same ranking, different distribution
    for tail in (False, True):
        union = losses.topk_logits_loss(student, teacher, 5, 0.5, tail, support="union")
        torch.testing.assert_close(union, losses.topk_logits_loss(student, teacher, 5, 0.5, tail), atol=1e-9, rtol=0)


def test_teacher_support_sees_the_answer_the_student_does_not_propose():
    """The case measured on SmolLM2: the teacher's answer token is far outside the student's top-k."""
    vocab = 100
    student = torch.zeros(1, 1, vocab, dtype=torch.double)
    student[..., :10] = 5.0  # the student proposes tokens 0-9
    teacher = torch.zeros(1, 1, vocab, dtype=torch.double)
    teacher[..., 77] = 8.0  # the teacher is sure of token 77
    grads = {}
    for support in losses.TOPK_SUPPORTS:
        s = student.clone().requires_grad_(True)
        losses.topk_logits_loss(s, teacher, 10, 0.0, support=support).sum().backward()
        grads[support] = s.grad[0, 0, 77].item()
    assert abs(grads["student"]) < 1e-12  # token 77 is not in the support: nothing pulls it up
    assert grads["teacher"] < -0.1 and grads["union"] < -0.1  # descent raises its logit


def test_unknown_support():
    with pytest.raises(ValueError, match="Unknown top-k support"):
        losses.topk_support(logits(0), logits(1), 3, "both")


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tail", [False, True])
def test_given_teacher_topk_equals_teacher_support_from_full_logits(alpha, tail):
    """The server path (only the teacher's top-k log-probs known) is `topk_logits` on the teacher's support."""
    torch.manual_seed(3)
    student = torch.randn(2, 5, 40, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 40, dtype=torch.float64)
    top = teacher.log_softmax(-1).topk(7, dim=-1)
    served = losses.given_teacher_topk_loss(student, top.values, top.indices, alpha, tail)
    local = losses.topk_logits_loss(student, teacher, 7, alpha, tail, support="teacher")
    assert torch.allclose(served, local, atol=1e-10)
    (grad_served,) = torch.autograd.grad(served.sum(), student)
    (grad_local,) = torch.autograd.grad(local.sum(), student)
    assert torch.allclose(grad_served, grad_local, atol=1e-10)


def test_given_teacher_topk_leaves_out_missing_entries():
    """A server that returned fewer than k entries pads with -inf: those slots carry no mass and no gradient."""
    torch.manual_seed(4)
    student = torch.randn(1, 3, 30, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(1, 3, 30, dtype=torch.float64).log_softmax(-1)
    top = teacher.topk(4, dim=-1)
    padded_values = torch.cat([top.values, torch.full((1, 3, 2), float("-inf"), dtype=torch.float64)], -1)
    padded_ids = torch.cat([top.indices, torch.zeros((1, 3, 2), dtype=torch.long)], -1)
    full = losses.given_teacher_topk_loss(student, padded_values, padded_ids, 0.5)
    assert torch.isfinite(full).all()
    assert torch.allclose(full, losses.given_teacher_topk_loss(student, top.values, top.indices, 0.5), atol=1e-10)
    (grad,) = torch.autograd.grad(full.sum(), student)
    assert torch.isfinite(grad).all()
