"""Importance weighting (`importance.py`): the ratio, which log-probs a batch carries, the weights and their metrics."""

import ast
import inspect
import itertools
import math

import pytest
import torch

from trl_sdft import importance
from trl_sdft.importance import ENGINE_MODES, ImportanceSettings, LogpsPlan

NAN = float("nan")


def test_module_depends_on_torch_and_the_standard_library_only():
    tree = ast.parse(inspect.getsource(importance))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "importance.py imports from trl_sdft"
            imported.add(node.module.split(".")[0])
    assert imported <= {"dataclasses", "typing", "torch"}


# ------------------------------------------------------------------------------------------------------------- ratio
def test_ratio_is_exp_of_the_difference_and_one_where_the_reference_is_unknown():
    current = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    reference = torch.tensor([[-1.0, -1.0, -2.0, NAN]])
    got = importance.ratio(current, reference)
    want = torch.tensor([[1.0, math.exp(-1.0), math.exp(1.5), 1.0]])
    torch.testing.assert_close(got, want)


def test_ratio_clamps_the_log_ratio_and_is_detached():
    current = torch.tensor([0.0, -50.0, -1.0], requires_grad=True)
    reference = torch.tensor([-30.0, 0.0, -1.0])
    got = importance.ratio(current, reference)
    torch.testing.assert_close(got, torch.tensor([math.exp(20.0), math.exp(-20.0), 1.0]))
    assert not got.requires_grad


def test_ratio_is_not_symmetric():
    a, b = torch.tensor([-0.2]), torch.tensor([-1.2])
    torch.testing.assert_close(importance.ratio(a, b), torch.tensor([math.e]))
    torch.testing.assert_close(importance.ratio(b, a), torch.tensor([1.0 / math.e]))


# -------------------------------------------------------------------------------------------------------------- plan
PLAN_TABLE = [
    # (settings, training, has_engine_logps) -> plan
    (dict(), True, False, LogpsPlan(None, False)),
    (dict(), True, True, LogpsPlan(None, False)),  # engine log-probs but no correction: not carried
    (dict(engine_mode="token_truncate"), True, True, LogpsPlan(None, True)),
    (dict(engine_mode="token_truncate"), True, False, LogpsPlan(None, False)),
    (dict(engine_mode="token_mask"), False, True, LogpsPlan(None, True)),  # eval batches are corrected too
    (dict(reused_rollouts=True), True, False, LogpsPlan("trainer", False)),
    (dict(reused_rollouts=True), False, False, LogpsPlan(None, False)),  # eval: never trained on after a step
    (dict(reused_rollouts=True, engine_mode="token_truncate"), True, True, LogpsPlan("trainer", True)),
    (dict(server_policy=True), True, True, LogpsPlan("server", False)),
    # the server's log-probs are the old policy's, not a mismatch to correct
    (dict(server_policy=True, engine_mode="token_truncate"), True, True, LogpsPlan("server", False)),
    (dict(server_policy=True, reused_rollouts=True), True, True, LogpsPlan("server", False)),
    (dict(server_policy=True, reused_rollouts=True), True, False, LogpsPlan("trainer", False)),
    (dict(server_policy=True, engine_mode="token_truncate"), False, True, LogpsPlan(None, True)),  # eval: on-policy
    (dict(from_teacher=True, engine_mode="token_truncate"), False, True, LogpsPlan(None, False)),
    (dict(from_teacher=True, reused_rollouts=True, engine_mode="token_mask"), True, True, LogpsPlan(None, False)),
    (dict(from_teacher=True, server_policy=True), True, True, LogpsPlan(None, False)),
]


@pytest.mark.parametrize("fields, training, has_engine, want", PLAN_TABLE)
def test_plan_table(fields, training, has_engine, want):
    assert importance.plan(ImportanceSettings(**fields), training, has_engine) == want


def _previous_trainer_decisions(settings, training, has_engine):
    """The conditions `SDFTTrainer.build_batch` wrote inline before `plan` existed (an independent oracle)."""
    stale = has_engine if training and settings.server_policy else False
    from_teacher = settings.from_teacher
    engine = has_engine and bool(settings.engine_mode) and not from_teacher and not stale
    if stale and not from_teacher:
        old = "server"
    elif training and not from_teacher and settings.reused_rollouts:
        old = "trainer"
    else:
        old = None
    return old, engine


@pytest.mark.parametrize("mode", [None, "token_truncate"])
def test_plan_equals_the_previous_decisions_everywhere(mode):
    for flags in itertools.product([False, True], repeat=5):
        reused, server, from_teacher, training, has_engine = flags
        settings = ImportanceSettings(
            engine_mode=mode, reused_rollouts=reused, server_policy=server, from_teacher=from_teacher
        )
        got = importance.plan(settings, training, has_engine)
        assert tuple(got) == _previous_trainer_decisions(settings, training, has_engine), flags


def test_engine_logps_needed():
    assert not importance.engine_logps_needed(ImportanceSettings())
    assert not importance.engine_logps_needed(ImportanceSettings(is_clip=2.0, reused_rollouts=True))
    assert importance.engine_logps_needed(ImportanceSettings(engine_mode="token_mask"))
    assert importance.engine_logps_needed(ImportanceSettings(server_policy=True))


# ----------------------------------------------------------------------------------------------------------- weights
BEHAVIOUR = torch.log(torch.tensor([[0.5, 0.2, 0.9, 0.3]]))
SAMPLING = torch.log(torch.tensor([[0.5, 0.4, 0.3, NAN]]))  # ratios 1, 0.5, 3, unknown


def engine(mode, low=None, high=None):
    return ImportanceSettings(engine_mode=mode, engine_min=low, engine_max=high)


def test_engine_weights_truncate_and_mask():
    """On-policy (no old log-probs): the trainer side of the ratio is the student's."""
    truncated = importance.token_weights(engine("token_truncate", 0.6, 2.0), BEHAVIOUR, None, SAMPLING)
    torch.testing.assert_close(truncated, torch.tensor([[1.0, 0.6, 2.0, 1.0]]))
    masked = importance.token_weights(engine("token_mask", 0.6, 2.0), BEHAVIOUR, None, SAMPLING)
    torch.testing.assert_close(masked, torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    unbounded = importance.token_weights(engine("token_truncate"), BEHAVIOUR, None, SAMPLING)
    torch.testing.assert_close(unbounded, torch.tensor([[1.0, 0.5, 3.0, 1.0]]))
    assert importance.token_weights(engine("token_mask"), BEHAVIOUR, None, SAMPLING).equal(unbounded)


@pytest.mark.parametrize(
    "low, high, want",
    [
        (0.6, None, [1.0, 0.0, 3.0, 1.0]),
        (None, 2.0, [1.0, 0.5, 0.0, 1.0]),
        (1.0, None, [1.0, 0.0, 3.0, 1.0]),  # a ratio of exactly 1 is kept at either bound
        (None, 1.0, [1.0, 0.5, 0.0, 1.0]),
    ],
)
def test_engine_mask_bounds_are_each_optional_and_inclusive(low, high, want):
    got = importance.token_weights(engine("token_mask", low, high), BEHAVIOUR, None, SAMPLING)
    torch.testing.assert_close(got, torch.tensor([want]))


@pytest.mark.parametrize("low, high, want", [(0.6, None, [1.0, 0.6, 3.0, 1.0]), (None, 2.0, [1.0, 0.5, 2.0, 1.0])])
def test_engine_truncate_bounds_are_each_optional(low, high, want):
    got = importance.token_weights(engine("token_truncate", low, high), BEHAVIOUR, None, SAMPLING)
    torch.testing.assert_close(got, torch.tensor([want]))


def test_clip_weight_caps_the_current_to_old_ratio():
    student = torch.log(torch.tensor([[0.9, 0.5, 0.1, 0.4]]))
    old = torch.log(torch.tensor([[0.3, 0.5, 0.2, NAN]]))  # ratios 3, 1, 0.5, unknown
    got = importance.token_weights(ImportanceSettings(is_clip=2.0), student, old)
    torch.testing.assert_close(got, torch.tensor([[2.0, 1.0, 0.5, 1.0]]))
    # the clip weight needs the old log-probs; the engine log-probs alone give none when only clipping is on
    assert importance.token_weights(ImportanceSettings(is_clip=2.0), student, None, old) is None


def test_engine_weight_is_against_the_old_log_probs_when_given():
    student = torch.log(torch.tensor([[0.9, 0.9]]))
    old = torch.log(torch.tensor([[0.4, 0.2]]))
    sampled = torch.log(torch.tensor([[0.2, 0.4]]))
    got = importance.token_weights(engine("token_truncate"), student, old, sampled)
    torch.testing.assert_close(got, torch.tensor([[2.0, 0.5]]))  # old / engine, not student / engine


def test_both_weights_multiply():
    student = torch.log(torch.tensor([[0.9, 0.2, 0.6]]))
    old = torch.log(torch.tensor([[0.3, 0.4, 0.6]]))  # clip ratios 3 -> 2 (cap), 0.5, 1
    sampled = torch.log(torch.tensor([[0.1, 0.4, 0.2]]))  # old/engine 3 -> 2.5 (truncated), 1, 3 -> 2.5
    settings = ImportanceSettings(is_clip=2.0, engine_mode="token_truncate", engine_max=2.5)
    got = importance.token_weights(settings, student, old, sampled)
    torch.testing.assert_close(got, torch.tensor([[5.0, 0.5, 2.5]]))


def test_no_weights_when_nothing_applies():
    logps = torch.log(torch.tensor([[0.5, 0.2]]))
    other = torch.log(torch.tensor([[0.25, 0.4]]))
    assert importance.token_weights(ImportanceSettings(), logps, other, other) is None  # every correction off
    assert importance.token_weights(ImportanceSettings(is_clip=2.0), logps, None, None) is None  # fresh rollouts
    assert importance.token_weights(engine("token_truncate", None, 2.0), logps, other, None) is None  # no engine logps


def test_weights_are_detached():
    student = torch.log(torch.tensor([[0.9, 0.2]])).requires_grad_(True)
    old = torch.log(torch.tensor([[0.3, 0.4]]))
    settings = ImportanceSettings(is_clip=2.0, engine_mode="token_mask", engine_max=5.0)
    assert not importance.token_weights(settings, student, old, old).requires_grad
    assert not importance.token_weights(settings, student, None, old).requires_grad


# ----------------------------------------------------------------------------------------------------------- metrics
def test_metric_names_follow_the_corrections_in_use():
    logps = torch.log(torch.tensor([[0.5, 0.2]]))
    mask = torch.ones(1, 2)
    clip_names = {"importance_ratio", "importance_clipped_fraction"}
    engine_names = {"vllm_importance_ratio", "vllm_importance_clipped_fraction", "vllm_logprob_abs_diff"}
    both = ImportanceSettings(is_clip=2.0, engine_mode="token_truncate", engine_max=2.0)
    assert set(importance.metrics(both, logps, mask, logps, logps)) == clip_names | engine_names
    assert set(importance.metrics(both, logps, mask, logps, None)) == clip_names
    assert set(importance.metrics(both, logps, mask, None, logps)) == engine_names
    assert importance.metrics(ImportanceSettings(), logps, mask, logps, logps) == {}


def test_metric_values_are_token_means_over_the_mask():
    student = torch.log(torch.tensor([[0.9, 0.5, 0.1, 0.7]]))
    old = torch.log(torch.tensor([[0.3, 0.5, 0.2, 0.7]]))  # clip ratios 3, 1, 0.5, (masked)
    sampled = torch.log(torch.tensor([[0.1, 0.25, 0.4, 0.7]]))  # old/engine 3, 2, 0.5, (masked)
    mask = torch.tensor([[1, 1, 1, 0]])
    settings = ImportanceSettings(is_clip=2.0, engine_mode="token_mask", engine_min=0.6, engine_max=2.5)
    got = importance.metrics(settings, student, mask, old, sampled)
    want = {
        "importance_ratio": (3.0 + 1.0 + 0.5) / 3,
        "importance_clipped_fraction": 1 / 3,  # 3 > 2
        "vllm_importance_ratio": (3.0 + 2.0 + 0.5) / 3,
        "vllm_importance_clipped_fraction": 2 / 3,  # 3 > 2.5, 0.5 < 0.6
        "vllm_logprob_abs_diff": (math.log(3.0) + math.log(2.0) + math.log(2.0)) / 3,
    }
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].item() == pytest.approx(value, rel=1e-5), name
    # a ratio exactly at the cap is not counted as clipped (the weight is unchanged there)
    at_cap = importance.metrics(ImportanceSettings(is_clip=1.0), student, mask, student)
    assert at_cap["importance_clipped_fraction"].item() == 0.0


def test_engine_metrics_on_policy_use_the_student_and_open_bounds():
    student = torch.log(torch.tensor([[0.8, 0.2]]))
    sampled = torch.log(torch.tensor([[0.2, 0.2]]))  # ratios 4, 1
    got = importance.metrics(engine("token_truncate"), student, torch.ones(1, 2), None, sampled)
    assert got["vllm_importance_ratio"].item() == pytest.approx(2.5)
    assert got["vllm_importance_clipped_fraction"].item() == 0.0  # no bounds: nothing clipped
    assert got["vllm_logprob_abs_diff"].item() == pytest.approx(math.log(4.0) / 2)


# -------------------------------------------------------------------------------------------------------- validation
def test_engine_modes():
    assert ENGINE_MODES == ("token_truncate", "token_mask")


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(is_clip=0.0), "distillation_is_clip=0.0"),
        (dict(is_clip=-1.0), "must be > 0"),
        (dict(engine_mode="sequence_mask"), "per token"),
        (dict(engine_min=-0.1), "clip_min < clip_max"),
        (dict(engine_max=0.0), "clip_max"),
        (dict(engine_min=2.0, engine_max=1.0), "clip_min < clip_max"),
        (dict(engine_min=2.0, engine_max=2.0), "clip_min < clip_max"),
    ],
)
def test_bad_settings_raise(fields, message):
    with pytest.raises(ValueError, match=message):
        ImportanceSettings(**fields)


def test_good_settings_and_defaults():
    assert ImportanceSettings() == ImportanceSettings(None, None, None, None, False, False, False)
    ImportanceSettings(is_clip=2.0, engine_mode="token_mask", engine_min=0.0, engine_max=2.0)
    ImportanceSettings(engine_min=0.5)  # either bound may be None
    with pytest.raises(AttributeError):
        ImportanceSettings().is_clip = 1.0  # frozen
