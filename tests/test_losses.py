"""Our pure loss functions against trl.experimental.sdft.loss_utils (used here as an oracle only)."""

import pytest
import torch
from trl.experimental.sdft import loss_utils as trl_loss_utils

from trl_sdft import importance, losses
from trl_sdft.importance import ImportanceSettings

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
        lambda s, t: losses.generalized_jsd(s.log_softmax(-1), t.log_softmax(-1), alpha),
        lambda s, t: trl_loss_utils.compute_full_logit_self_distillation_loss(s, t, distillation_alpha=alpha),
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
        lambda s, t: trl_loss_utils.compute_topk_self_distillation_loss(
            s, t, distillation_topk=k, distillation_alpha=alpha, distillation_add_tail=tail
        ),
    )
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-6, rtol=0)


def test_sampled_token_matches_peer():
    ids = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(3))
    (ours, g_ours), (theirs, g_theirs) = both(
        lambda s, t: losses.per_token_loss(losses.LossSettings("sampled_token", alpha=1.0), s, t, ids)[0],
        lambda s, t: trl_loss_utils.compute_sampled_token_self_distillation_loss(s, t, ids, distillation_alpha=1.0),
    )
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-6, rtol=0)


def test_tail_bucket_and_clipping_match_peer():
    log_probs = logits(5).log_softmax(-1)[..., :10]
    torch.testing.assert_close(losses.with_tail_bucket(log_probs), trl_loss_utils.add_tail_bucket(log_probs))
    assert torch.allclose(losses.with_tail_bucket(log_probs).logsumexp(-1), torch.zeros(3, 5, dtype=torch.double))
    per_token, student, old = logits(6)[..., 0].abs(), logits(7)[..., 0], logits(8)[..., 0]
    ours = per_token * importance.token_weights(ImportanceSettings(is_clip=2.0), student, old)
    torch.testing.assert_close(ours, trl_loss_utils.apply_importance_sampling_clipping(per_token, student, old, 2.0))
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


@pytest.mark.parametrize(
    "settings",
    [
        losses.LossSettings("topk_logits", alpha=0.5, topk=3),
        losses.LossSettings("full_logits", alpha=0.0),
        losses.LossSettings("full_logits", alpha=0.5),
        losses.LossSettings("sampled_token", alpha=1.0),
    ],
    ids=lambda s: f"{s.mode}-{s.alpha}",
)
def test_per_token_loss_shares_normalizers_with_its_metrics(settings):
    """The KL metric and the token log-probs that `per_token_loss` derives from its shared log-normalizers equal the
    textbook log-softmax formulas."""
    s, t = logits(21).float() * 3, logits(22).float() * 3
    ids = torch.randint(0, s.size(-1), s.shape[:-1], generator=torch.Generator().manual_seed(0))
    result = losses.per_token_loss(settings, s, t, ids, with_kl=True)
    torch.testing.assert_close(result.kl, losses.kl(t.log_softmax(-1), s.log_softmax(-1)), atol=1e-5, rtol=1e-5)
    want_logps = s.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(result.student_logps, want_logps, atol=1e-5, rtol=1e-5)
    assert losses.per_token_loss(settings, s, t, ids).kl is None  # not computed unless asked for


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
    """On the teacher's top-k, JSD_alpha(student, teacher) = TRL's JSD_(1-alpha) with the roles swapped."""
    student, teacher = logits(20), logits(21)
    ours = losses.topk_logits_loss(student, teacher, 7, alpha, tail, support="teacher")
    swapped = trl_loss_utils.compute_topk_self_distillation_loss(
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


# ------------------------------------------------------------------------------------ vLLM mismatch correction
# The weights themselves (truncate, mask, clipping) are tested in test_importance.py; here, how the loss applies them.
@pytest.mark.parametrize("old", [False, True], ids=["on-policy", "reused"])
def test_per_token_loss_weights_by_the_engine_ratio(old):
    from dataclasses import replace

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    settings = losses.LossSettings(
        mode="topk_logits",
        alpha=0.5,
        topk=4,
        importance=ImportanceSettings(engine_mode="token_truncate", engine_max=2.0),
    )
    plain, student_logps, _ = losses.per_token_loss(
        replace(settings, importance=ImportanceSettings()), student, teacher, ids
    )
    old_logps = student_logps - 0.3 if old else None
    behaviour = old_logps if old else student_logps
    engine = behaviour + torch.randn(2, 5, generator=g)
    # Without the engine's log-probs, or with the correction off, nothing changes.
    assert torch.equal(losses.per_token_loss(settings, student, teacher, ids)[0], plain)
    corrected, *_ = losses.per_token_loss(settings, student, teacher, ids, old_logps, sampling_logps=engine)
    assert torch.allclose(corrected, plain * (behaviour - engine).exp().clamp(max=2.0), atol=1e-6)
    assert not torch.allclose(corrected, plain)
    metrics = importance.metrics(settings.importance, student_logps, torch.ones(2, 5), old_logps, engine)
    assert torch.isclose(metrics["vllm_importance_ratio"], (behaviour - engine).exp().mean())
    assert torch.isclose(metrics["vllm_importance_clipped_fraction"], ((behaviour - engine).exp() > 2).float().mean())


def test_chunked_loss_applies_the_engine_ratio_like_the_logits_path():
    from trl_sdft import chunked_loss

    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(2, 6, 8, generator=g), torch.randn(13, 8, generator=g)
    teacher_hidden = torch.randn(2, 6, 8, generator=g)
    ids = torch.randint(0, 13, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    engine_correction = ImportanceSettings(engine_mode="token_mask", engine_max=1.5)
    settings = losses.LossSettings(mode="full_logits", alpha=0.0, importance=engine_correction)
    engine = losses.token_log_probs(hidden @ weight.t(), ids) + torch.randn(2, 6, generator=g) * 0.5
    want = losses.logits_loss(settings, hidden @ weight.t(), teacher_hidden @ weight.t(), ids, mask, None, engine)
    chunked = replace_chunk(settings, 3)
    got = chunked_loss.hidden_states_loss(
        chunked,
        chunked_loss.HiddenStates(hidden, weight),
        chunked_loss.HiddenStates(teacher_hidden, weight),
        ids,
        mask,
        None,
        engine,
    )
    assert torch.allclose(got.loss, want.loss, atol=1e-6)
    assert torch.isclose(
        got.metrics["vllm_importance_clipped_fraction"], want.metrics["vllm_importance_clipped_fraction"]
    )
    assert want.metrics["vllm_importance_clipped_fraction"] > 0


def replace_chunk(settings, chunk_size):
    from dataclasses import replace

    return replace(settings, chunk_size=chunk_size)
