"""Importance weighting: which rollout log-probs a batch carries, and the per-token weights the loss multiplies by.

Two corrections, each a detached ratio per completion token, both off unless the run needs them:

- Clipping (`is_clip`): a rollout trained on after an optimizer step (reused, or generated ahead on the vLLM server)
  was sampled by an older policy; each token is weighted by `pi_now(y_t) / pi_old(y_t)`, capped at `is_clip`.
- Engine correction (`engine_mode`): the rollout engine (vLLM) samples from a slightly different distribution than
  the trainer's; each token is weighted by `pi_trainer(y_t) / pi_engine(y_t)`, truncated to `[engine_min, engine_max]`
  (`token_truncate`) or set to 0 outside it (`token_mask`), as TRL's GRPO `vllm_importance_sampling_mode`. The trainer
  side is the old policy's log-probs when the rollout is reused, else the current student's.

`plan` tells the trainer which log-probs to attach to a batch; `token_weights` and `metrics` are what the loss paths
(`losses.py`, `chunked_loss.py`) call. Pure functions of tensors and an `ImportanceSettings`; no config, no trainer.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch

ENGINE_MODES = ("token_truncate", "token_mask")


@dataclass(frozen=True)
class ImportanceSettings:
    """The importance-weighting options of one run (`settings.importance_settings` builds them from `SDFTConfig`)."""

    is_clip: float | None = None  # `distillation_is_clip`: cap of the current/rollout-policy ratio; None: off
    engine_mode: str | None = None  # `vllm_importance_sampling_mode` when the engine correction is on, else None
    engine_min: float | None = None  # `vllm_importance_sampling_clip_min`
    engine_max: float | None = None  # `vllm_importance_sampling_clip_max`
    reused_rollouts: bool = False  # a generation round outlives an optimizer step: the trainer keeps its log-probs
    server_policy: bool = False  # rollouts generated ahead on the server: its log-probs are the rollout policy's
    from_teacher: bool = False  # rollouts sampled from the teacher prompt: no importance weights at all

    def __post_init__(self):
        if self.is_clip is not None and self.is_clip <= 0:
            raise ValueError(f"`distillation_is_clip={self.is_clip}` must be > 0 (e.g. 2.0), or None to disable it.")
        if self.engine_mode is not None and self.engine_mode not in ENGINE_MODES:
            raise ValueError(
                f"`vllm_importance_sampling_mode={self.engine_mode!r}` is not supported: use one of "
                f"{', '.join(map(repr, ENGINE_MODES))}. The SDFT loss is a divergence at each completion position, so "
                "its correction is per token, as in the original SDFT implementation; sequence-level modes are GRPO's."
            )
        low, high = self.engine_min, self.engine_max
        if (
            (low is not None and low < 0)
            or (high is not None and high <= 0)
            or (None not in (low, high) and low >= high)
        ):
            raise ValueError(
                f"`vllm_importance_sampling_clip_min={low}` / `vllm_importance_sampling_clip_max={high}`: need "
                "0 <= clip_min < clip_max (either may be None), e.g. clip_max=2.0."
            )


def ratio(current: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`exp(current - reference)`, detached, the log-ratio clamped to [-20, 20]; 1 where `reference` is NaN (an engine
    that returned no log-prob for that token)."""
    current = current.detach()
    reference = torch.where(torch.isnan(reference), current, reference)
    return (current - reference).clamp(-20.0, 20.0).exp()


class LogpsPlan(NamedTuple):
    """Which rollout log-probs a batch must carry: `old` the rollout policy's (`"server"`: the log-probs the server
    returned with the rollout; `"trainer"`: computed by the trainer before any optimizer step; None: none), and
    `engine` whether the engine's own log-probs go along (as `sampling_per_token_logps`)."""

    old: str | None
    engine: bool


def plan(settings: ImportanceSettings, training: bool, has_engine_logps: bool) -> LogpsPlan:
    """The log-probs the trainer attaches to a batch (`training`: a train batch; `has_engine_logps`: the rollout
    backend returned log-probs). On the server policy, the engine's log-probs are the old ones, not a mismatch."""
    if settings.from_teacher:
        return LogpsPlan(None, False)
    server = training and settings.server_policy and has_engine_logps
    old = "server" if server else ("trainer" if training and settings.reused_rollouts else None)
    return LogpsPlan(old, has_engine_logps and settings.engine_mode is not None and not server)


def engine_logps_needed(settings: ImportanceSettings) -> bool:
    """Whether the rollout engine must return the log-probs of the tokens it sampled."""
    return settings.engine_mode is not None or settings.server_policy


def _engine_weights(settings: ImportanceSettings, behaviour: torch.Tensor, engine: torch.Tensor) -> torch.Tensor:
    """`ratio(behaviour, engine)` truncated to `[engine_min, engine_max]` (`token_truncate`), or 0 outside it
    (`token_mask`)."""
    weights = ratio(behaviour, engine)
    low, high = settings.engine_min, settings.engine_max
    if settings.engine_mode == "token_truncate":
        return weights if low is None and high is None else weights.clamp(min=low, max=high)
    keep = torch.ones_like(weights, dtype=torch.bool)
    if low is not None:
        keep &= weights >= low
    if high is not None:
        keep &= weights <= high
    return weights * keep


def token_weights(
    settings: ImportanceSettings,
    student_logps: torch.Tensor,
    old_logps: torch.Tensor | None = None,
    engine_logps: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The detached per-token weights the loss multiplies by, or None when no correction applies.

    `student_logps`: the current student's log-probs of the completion tokens; `old_logps`: the rollout policy's (reused
    or stale rollouts); `engine_logps`: the rollout engine's. Each factor applies when its option is on and its log-probs
    are given: the clip weight `ratio(student, old)` capped at `is_clip`, and the engine weight against the old
    log-probs when given, else the student's."""
    weights = None
    if settings.is_clip is not None and old_logps is not None:
        weights = ratio(student_logps, old_logps).clamp(max=settings.is_clip)
    if settings.engine_mode is not None and engine_logps is not None:
        behaviour = student_logps if old_logps is None else old_logps
        engine = _engine_weights(settings, behaviour, engine_logps)
        weights = engine if weights is None else weights * engine
    return weights


def _token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def metrics(
    settings: ImportanceSettings,
    student_logps: torch.Tensor,
    mask: torch.Tensor,
    old_logps: torch.Tensor | None = None,
    engine_logps: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The metrics of the weights in use, as token means over `mask`: for clipping, the mean ratio of the current
    student to the rollout policy and the share of tokens capped (`importance_*`); for the engine correction, the mean
    trainer/engine ratio, the share of tokens truncated or masked, and the mean absolute log-prob gap (`vllm_*`)."""
    out = {}
    if settings.is_clip is not None and old_logps is not None:
        clip_ratio = ratio(student_logps, old_logps)
        out["importance_ratio"] = _token_mean(clip_ratio, mask)
        out["importance_clipped_fraction"] = _token_mean((clip_ratio > settings.is_clip).float(), mask)
    if settings.engine_mode is not None and engine_logps is not None:
        behaviour = student_logps if old_logps is None else old_logps
        engine_ratio = ratio(behaviour, engine_logps)
        low = settings.engine_min if settings.engine_min is not None else 0.0
        high = settings.engine_max if settings.engine_max is not None else float("inf")
        clipped = ((engine_ratio < low) | (engine_ratio > high)).float()
        out["vllm_importance_ratio"] = _token_mean(engine_ratio, mask)
        out["vllm_importance_clipped_fraction"] = _token_mean(clipped, mask)
        out["vllm_logprob_abs_diff"] = _token_mean(engine_ratio.log().abs(), mask)
    return out
