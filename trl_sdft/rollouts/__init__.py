"""Rollout backends: sample completions for a batch of tokenized prompts.

A backend is anything with the `RolloutBackend` protocol: `generate(model, prompt_ids, num_generations, step,
max_new_tokens=None) -> Rollouts`, `close()` and `describe()`. `prompt_ids` are the token ids of each prompt (already
repeated `num_generations` times by the sampler), `step` the optimizer step of the weights to sample with and
`max_new_tokens` a budget per prompt (None: `max_completion_length` each; multi-turn rollouts ask for the room a
trajectory has left). Each completion ends at its first end-of-sequence token, and engines that report their own
log-probs of the sampled tokens (vLLM) return them too. Backends registered before budgets existed (a `generate` without
`max_new_tokens`) still work: `generate_within` cuts their completions to the budget. A backend that can generate a
round while the trainer learns (`async_rollouts`) also has `start` and `finish` (`BackgroundRollouts`), and one that
scores the teacher (`use_teacher_server`) has `teacher_scores` (`TeacherScorer`).

Backends are built by name from `ROLLOUT_BACKENDS` (`build_rollout`), which holds "transformers"
(`transformers.TransformersRollout`, `model.generate`) and "vllm" (`vllm.VLLMRollout`, a colocated or a server vLLM
engine; imported only when built, so that `import trl_sdft` never imports vLLM). `register_rollout_backend` adds one.
Backends read `RolloutSettings` (built from the config by `trl_sdft.settings.rollout_settings`), never the config.
"""

from .base import (
    ROLLOUT_BACKENDS,
    SAMPLING_FIELDS,
    BackgroundRollouts,
    PendingRound,
    RolloutBackend,
    RolloutContext,
    RolloutFactory,
    Rollouts,
    RolloutSettings,
    TeacherScorer,
    VLLMServerError,
    VLLMSettings,
    build_rollout,
    cut_at_eos,
    eos_token_ids,
    generate_within,
    register_rollout_backend,
    rollout_backends,
    sampling_config,
    takes_budgets,
    within_budgets,
)


# The built-in backends, registered here (the package's face) so that `base.py` imports none of its implementations.
def _transformers_backend(context: RolloutContext) -> RolloutBackend:
    from .transformers import TransformersRollout

    return TransformersRollout.from_context(context)


def _vllm_backend(context: RolloutContext) -> RolloutBackend:
    from .vllm import VLLMRollout  # vLLM is imported only here

    return VLLMRollout(context)


register_rollout_backend("transformers", _transformers_backend)
register_rollout_backend("vllm", _vllm_backend)

__all__ = [
    "ROLLOUT_BACKENDS",
    "SAMPLING_FIELDS",
    "BackgroundRollouts",
    "PendingRound",
    "RolloutBackend",
    "RolloutContext",
    "RolloutFactory",
    "RolloutSettings",
    "Rollouts",
    "TeacherScorer",
    "VLLMServerError",
    "VLLMSettings",
    "build_rollout",
    "cut_at_eos",
    "eos_token_ids",
    "generate_within",
    "register_rollout_backend",
    "rollout_backends",
    "sampling_config",
    "takes_budgets",
    "within_budgets",
]
