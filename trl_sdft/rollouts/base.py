"""The rollout layer's contract: the settings backends read, what they return (`Rollouts`, `PendingRound`), the
protocols (`RolloutBackend`, `BackgroundRollouts`, `TeacherScorer`), the registry of backends by name and the helpers
every backend shares (end ids, budgets, the sampling config). The package's `__init__` re-exports all of it, so
`trl_sdft.rollouts.register_rollout_backend` and the other public names keep their paths."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

from transformers import GenerationConfig

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "cache_implementation")


# ------------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class VLLMSettings:
    """The vLLM engine's options: `SDFTConfig`'s `vllm_*` fields without the prefix, and the trainer's precision."""

    mode: str = "colocate"
    server_base_url: str | None = None
    server_host: str = "0.0.0.0"
    server_port: int = 8000
    server_timeout: float = 240.0
    group_port: int = 51216
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.3
    max_model_length: int | None = None
    enable_sleep_mode: bool = False
    model_impl: str = "vllm"
    dtype: str | None = None
    enforce_eager: bool | None = None
    sync_dir: str | None = None
    precision: str | None = None  # "bf16" / "fp16" when the trainer runs mixed precision (`vllm.engine_dtype`)


@dataclass(frozen=True)
class RolloutSettings:
    """How completions are sampled, and by which registered backend (`backend`)."""

    backend: str = "transformers"
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    cache_implementation: str | None = None
    generation_kwargs: dict | None = None
    gather_deepspeed3_params: bool = True  # ZeRO-3 weights gathered for generation
    generate_from_teacher: bool = False  # rollouts from the teacher prompt (its length bounds the context)
    engine_logprobs: bool = False  # the engine returns its log-prob of each sampled token
    teacher_on_server: bool = False  # the backend also scores the teacher (`TeacherScorer`)
    trust_remote_code: bool = False
    vllm: VLLMSettings | None = None

    def __post_init__(self):
        if self.max_completion_length is None:
            raise ValueError("`max_completion_length` must be set (e.g. 256): rollouts need a length limit.")
        if self.max_completion_length < 1:
            raise ValueError(
                f"`max_completion_length={self.max_completion_length}` must be >= 1, or None for no limit."
            )
        if self.temperature <= 0:
            raise ValueError(f"`temperature={self.temperature}` must be > 0 (logits are divided by it).")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"`top_p={self.top_p}` must be in (0, 1]; 1.0 disables nucleus sampling.")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"`top_k={self.top_k}` must be >= 0; 0 disables top-k sampling.")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"`min_p={self.min_p}` must be in [0, 1] or None.")


# ------------------------------------------------------------------------------------------------ what they return
class Rollouts(NamedTuple):
    """One round's rollouts, what a backend's `generate` returns and what the trainer reads, by name.

    `completions`: token ids, each cut after its first end-of-sequence token. `logprobs`: from engines that report them
    (vLLM), the engine's log-prob of each token; NaN where there is none (tool results). Multi-turn rollouts with tools
    (`agentic.ToolCallingLoop`) add `tool_mask` (1 on the tokens the model generated, 0 on tool results and the
    template's turn headers), `tool_stats` (the round's calls, a `tools.ToolStats`) and `truncated` (whether each
    trajectory was cut: by the length budget or the iteration limit, a call left unanswered); without `truncated` a
    completion is cut when it does not end on an end-of-sequence token."""

    completions: list[list[int]]
    logprobs: list[list[float]] | None = None
    tool_mask: list[list[int]] | None = None
    tool_stats: Any = None
    truncated: list[bool] | None = None


class PendingRound(NamedTuple):
    """A generation round started in the background (`BackgroundRollouts.start`): the main process's future of the
    whole round's completions, this process's share of it, and the optimizer step of the weights that generate it."""

    future: Future | None
    count: int
    step: int


class VLLMServerError(RuntimeError):
    """The vLLM server cannot be used: unreachable, a different model, or it stopped answering (`rollouts/vllm.py`)."""


# ------------------------------------------------------------------------------------------------------ protocols
@runtime_checkable
class RolloutBackend(Protocol):
    """What the trainer calls on a rollout backend."""

    def generate(
        self,
        model,
        prompt_ids: list[list[int]],
        num_generations: int,
        step: int,
        max_new_tokens: list[int] | None = None,
    ) -> Rollouts:
        """Completions of `prompt_ids` sampled with the weights of optimizer step `step`, each at most its
        `max_new_tokens` entry long (None: `max_completion_length`)."""
        ...

    def close(self) -> None:
        """End of training: release what the backend holds (threads, temporary files)."""
        ...

    def describe(self) -> str | None:
        """One line the trainer logs once the backend is built, or None."""
        ...


@runtime_checkable
class BackgroundRollouts(RolloutBackend, Protocol):
    """A backend that generates a round while the trainer learns (`async_rounds.AsyncRounds`)."""

    def start(self, prompt_ids: list[list[int]], num_generations: int, step: int) -> PendingRound:
        """Send a round off; returns at once."""
        ...

    def finish(self, pending: PendingRound) -> Rollouts:
        """Wait for the round `start` sent and return this process's share of it."""
        ...


@runtime_checkable
class TeacherScorer(Protocol):
    """A backend that scores the teacher's log-probs of the completion tokens (the vLLM server)."""

    def teacher_scores(self, teacher_input_ids, teacher_attention_mask, mask, top: int, step: int) -> Any:
        """`losses.ServerTeacherScores` of the completion positions `mask` marks, with the weights of step `step`."""
        ...


# ----------------------------------------------------------------------------------------------------- registry
@dataclass
class RolloutContext:
    """What a backend factory gets: the trainer's model and accelerator, the tokenizer, the settings, the end ids and
    the longest (student, teacher) prompt, in tokens (backends with a fixed context check them)."""

    model: Any
    accelerator: Any
    processing_class: Any
    tokenizer: Any
    settings: RolloutSettings
    eos_token_ids: list[int]
    longest_prompt: int = 0
    longest_teacher_prompt: int = 0


RolloutFactory = Callable[[RolloutContext], RolloutBackend]
ROLLOUT_BACKENDS: dict[str, RolloutFactory] = {}


def register_rollout_backend(name: str, factory: RolloutFactory, replace: bool = False) -> None:
    """Make `factory(context) -> RolloutBackend` the backend `name` (`RolloutSettings.backend`, the config's
    `rollout_backend`). A name already registered is refused unless `replace=True`."""
    if name in ROLLOUT_BACKENDS and not replace:
        raise ValueError(
            f"A rollout backend named {name!r} is already registered. Pick another name, or pass `replace=True` to "
            "replace it."
        )
    ROLLOUT_BACKENDS[name] = factory


def rollout_backends() -> tuple[str, ...]:
    """The registered backend names."""
    return tuple(ROLLOUT_BACKENDS)


def build_rollout(context: RolloutContext) -> RolloutBackend:
    """The backend `context.settings.backend` names, built by its registered factory."""
    name = context.settings.backend
    factory = ROLLOUT_BACKENDS.get(name)
    if factory is None:
        known = ", ".join(map(repr, ROLLOUT_BACKENDS))
        raise ValueError(
            f"Unknown rollout backend {name!r}; registered: {known}. Add one with "
            "`trl_sdft.rollouts.register_rollout_backend(name, factory)`."
        )
    return factory(context)


# ------------------------------------------------------------------------------------------------------- helpers
def cut_at_eos(rows: Iterable[Sequence[int]], eos_token_ids: Iterable[int]) -> list[list[int]]:
    """Each row up to and including its first end-of-sequence token (all of it if none)."""
    ends = set(eos_token_ids)
    completions = []
    for row in rows:
        row = list(row)
        end = next((position + 1 for position, token in enumerate(row) if token in ends), len(row))
        completions.append(row[:end])
    return completions


def takes_budgets(backend) -> bool:
    """Whether `backend.generate` takes `max_new_tokens` (backends registered before budgets existed do not)."""
    import inspect

    try:
        parameters = inspect.signature(backend.generate).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "max_new_tokens" or p.kind is p.VAR_KEYWORD for p in parameters)


def within_budgets(rollouts: Rollouts, budgets: list[int] | None) -> Rollouts:
    """`rollouts` with each completion (and its log-probs) cut to its budget."""
    if budgets is None:
        return rollouts
    completions = [list(ids)[:budget] for ids, budget in zip(rollouts.completions, budgets, strict=True)]
    logprobs = rollouts.logprobs
    if logprobs is not None:
        logprobs = [list(row)[: len(ids)] for row, ids in zip(logprobs, completions, strict=True)]
    return rollouts._replace(completions=completions, logprobs=logprobs)


def generate_within(backend, model, prompt_ids, num_generations, step, budgets=None, takes=None) -> Rollouts:
    """`backend.generate` with a token budget per prompt (`budgets`; None: the full `max_completion_length`). A backend
    whose `generate` takes no `max_new_tokens` (`takes`, default `takes_budgets(backend)`) generates in full and its
    completions are cut here."""
    if budgets is None:
        return backend.generate(model, prompt_ids, num_generations, step)
    if takes is None:
        takes = takes_budgets(backend)
    if takes:
        rollouts = backend.generate(model, prompt_ids, num_generations, step, max_new_tokens=list(budgets))
    else:
        rollouts = backend.generate(model, prompt_ids, num_generations, step)
    return within_budgets(rollouts, budgets)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every end id the model declares (e.g. end-of-turn) plus the tokenizer's."""
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.insert(0, tokenizer.eos_token_id)
    return ids


def sampling_config(settings: RolloutSettings, tokenizer, eos_ids: list[int]) -> GenerationConfig:
    """The rollouts' `GenerationConfig`: the sampling fields of `settings`, then `generation_kwargs` over them."""
    kwargs = dict(
        max_new_tokens=settings.max_completion_length,
        do_sample=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
        **{name: getattr(settings, name) for name in SAMPLING_FIELDS},
    )
    kwargs.update(settings.generation_kwargs or {})
    return GenerationConfig(**kwargs, disable_compile=True)
