"""`SDFTConfig` -> the small frozen settings object of each concern. The one module besides `config.py`, `trainer.py`
and the CLIs that reads config fields: every other module takes the settings built here, once per trainer.

| builder                | settings                                   | read by                                   |
|------------------------|--------------------------------------------|-------------------------------------------|
| `importance_settings`  | `importance.ImportanceSettings`            | the loss (weights, metrics), the trainer  |
| `loss_settings`        | `losses.LossSettings`                      | `losses.py`, `chunked_loss.py`            |
| `teacher_settings`     | `teachers.TeacherSettings`                 | `teachers.py`, the teacher registry       |
| `rollout_settings`     | `rollouts.RolloutSettings`                 | `rollouts/`, the rollout-backend registry |
| `vllm_settings`        | `rollouts.VLLMSettings`                    | `rollouts/vllm.py` (inside the above)     |
| `tool_loop_settings`   | `rollouts.agentic.ToolLoopSettings`        | `rollouts/agentic.py` (tool calls)        |
| `async_round_settings` | `rollouts.async_rounds.AsyncRoundSettings` | `rollouts/async_rounds.py`                |
| `model_settings`       | `models.ModelSettings`                     | `models.py` (loading the model)           |

Each settings class checks the ranges of its own fields when built (naming the config's field); `config.py` builds
them all once its generation batch is resolved, and keeps the rules that span several concerns. Each builder takes
the config (duck-typed: any object with the fields) and imports its class lazily, so that `config.py` can call them
without an import cycle.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .importance import ImportanceSettings
    from .losses import LossSettings
    from .models import ModelSettings
    from .rollouts import RolloutSettings, VLLMSettings
    from .rollouts.async_rounds import AsyncRoundSettings
    from .teachers import TeacherSettings


def importance_settings(args) -> ImportanceSettings:
    """Which importance weights the run applies: clipping of reused or stale rollouts, the vLLM engine correction."""
    from .importance import ImportanceSettings

    return ImportanceSettings(
        is_clip=args.distillation_is_clip,
        engine_mode=args.vllm_importance_sampling_mode if args.vllm_importance_sampling_active else None,
        engine_min=args.vllm_importance_sampling_clip_min,
        engine_max=args.vllm_importance_sampling_clip_max,
        reused_rollouts=args.rollouts_outlive_optimizer_step,
        server_policy=args.async_rollouts_active,
        from_teacher=args.generate_from_teacher,
    )


def loss_settings(args, chunk_size: int = 0) -> LossSettings:
    """The loss options; `chunk_size` 0 is the logits path (`chunked_loss.resolve_chunk_size` decides it)."""
    from .losses import LossSettings

    return LossSettings(
        mode=args.distillation_mode,
        alpha=args.distillation_alpha,
        topk=args.distillation_topk,
        add_tail=args.distillation_add_tail,
        support=args.distillation_topk_support,
        temperature=args.temperature,
        chunk_size=chunk_size,
        use_liger=bool(args.use_liger_kernel and chunk_size > 0),
        importance=importance_settings(args),
    )


def teacher_settings(args) -> TeacherSettings:
    """Which teacher scores the teacher prompt, how it moves, and where (in process, or on the vLLM server)."""
    from .teachers import TeacherSettings

    # How many teacher log-probs per position a teacher scored on a server returns: the top-k of `topk_logits`, else
    # the sampled token's.
    server_topk = args.distillation_topk if args.distillation_mode == "topk_logits" else 1
    return TeacherSettings(
        kind=args.teacher_model_kind,
        update_rate=args.teacher_update_rate,
        sync_steps=args.teacher_sync_steps,
        on_server=bool(getattr(args, "use_teacher_server", False)),
        server_topk=server_topk or 1,
        model_init_kwargs=dict(args.model_init_kwargs) if args.model_init_kwargs else None,
        trust_remote_code=args.trust_remote_code,
    )


def vllm_settings(args) -> VLLMSettings:
    from .rollouts import VLLMSettings

    # Every field but `precision` is the config's `vllm_<name>`.
    names = [field.name for field in fields(VLLMSettings) if field.name != "precision"]
    return VLLMSettings(
        **{name: getattr(args, f"vllm_{name}") for name in names},
        precision="bf16" if args.bf16 else "fp16" if args.fp16 else None,
    )


def rollout_backend_name(args) -> str:
    """`rollout_backend` when set (a registered backend), else "vllm" with `use_vllm`, else "transformers"."""
    chosen = getattr(args, "rollout_backend", None)
    if chosen:
        return chosen
    return "vllm" if args.use_vllm else "transformers"


def rollout_settings(args) -> RolloutSettings:
    """How completions are sampled, and by which registered backend."""
    from .importance import engine_logps_needed
    from .rollouts import RolloutSettings

    backend = rollout_backend_name(args)
    return RolloutSettings(
        backend=backend,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        cache_implementation=args.cache_implementation,
        generation_kwargs=dict(args.generation_kwargs) if args.generation_kwargs else None,
        gather_deepspeed3_params=args.ds3_gather_for_generation,
        generate_from_teacher=args.generate_from_teacher,
        engine_logprobs=engine_logps_needed(importance_settings(args)),
        teacher_on_server=bool(getattr(args, "use_teacher_server", False)),
        trust_remote_code=args.trust_remote_code,
        vllm=vllm_settings(args) if args.use_vllm else None,
    )


def async_round_settings(args) -> AsyncRoundSettings:
    """How rounds are generated ahead of training (`rollouts.async_rounds.AsyncRounds`)."""
    from .rollouts.async_rounds import AsyncRoundSettings

    return AsyncRoundSettings(
        num_generations=args.num_generations,
        generate_every=args.generate_every,
        max_staleness=args.max_staleness,
        span=args.round_span,
    )


def tool_loop_settings(args):
    """How multi-turn rollouts with tools end (`rollouts.agentic.ToolCallingLoop`)."""
    from .rollouts.agentic import ToolLoopSettings

    return ToolLoopSettings(
        max_completion_length=args.max_completion_length,
        max_iterations=args.max_tool_calling_iterations,
        call_timeout=args.tool_call_timeout,
    )


def model_settings(args) -> ModelSettings:
    """How a model given by name is loaded."""
    from .models import ModelSettings

    return ModelSettings(
        init_kwargs=dict(args.model_init_kwargs) if args.model_init_kwargs is not None else None,
        trust_remote_code=args.trust_remote_code,
        distributed_type=str(getattr(args.distributed_state.distributed_type, "value", "")),
    )
