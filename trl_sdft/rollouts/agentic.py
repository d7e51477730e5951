"""Multi-turn rollouts that call tools, over any rollout backend (`ToolCallingLoop`).

A rollout is a trajectory. The backend generates a turn from the prompt; a turn with tool calls (`chat_templates.
parse_turn`) has them run (`tools.call_tools`), their results rendered by the chat template after the turn
(`chat_templates.tool_suffix_ids`), and the backend generates the next turn from everything so far. A trajectory ends
with a turn without a tool call, after `max_iterations` rounds of tool calls, or when the next results would not leave
room for one more token within `max_completion_length` (the results are then not added, as in TRL). Each reply is
generated within the room its trajectory has left (`max_new_tokens`, one budget per prompt). A trajectory that ends
with a call left unanswered (either limit), or whose last turn was cut by the length budget, counts as truncated
(`completions/clipped_ratio`).

The completion holds every generated token and every token the template added (tool results, turn headers), and
`tool_mask` is 1 on the generated tokens only: the loss, the importance weights and the completion metrics read only
those. A trajectory without tool calls is exactly the backend's single-turn completion.

Every process runs the same number of backend calls: the processes agree on the most continuations any of them needs
and pad theirs with a placeholder (a budget of one token), so collective backends (vLLM server, ZeRO-3 gathering)
stay in step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..chat_templates import MALFORMED, parse_turn, tool_suffix_ids
from ..tools import ToolResult, ToolRunner, ToolStats, call_tools, failure
from .base import RolloutBackend, Rollouts, generate_within, takes_budgets

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToolLoopSettings:
    """`max_iterations`: rounds of tool calls per trajectory (None: until the length budget ends them);
    `max_completion_length`: generated and added tokens of a trajectory together."""

    max_completion_length: int = 256
    max_iterations: int | None = None
    call_timeout: float | None = None  # seconds per tool call (`tool_call_timeout`); None: no limit

    def __post_init__(self):
        if self.call_timeout is not None and not self.call_timeout > 0:
            raise ValueError(f"`tool_call_timeout={self.call_timeout}` must be > 0 seconds, or None for no limit.")
        if self.max_iterations is not None and self.max_iterations < 0:
            raise ValueError(f"`max_tool_calling_iterations={self.max_iterations}` must be >= 0, or None for no limit.")


class ToolCallingLoop:
    """Runs trajectories with `backend` (any `RolloutBackend`); each rollout's callables come with each `run`.

    `tools`: the schemas shown to the model (arguments are typed by them when a row's toolset has none); `accelerator`:
    the processes keep in step through it (None: one process); `end_ids`: a turn that ended on one may hold a tool call
    (default: the tokenizer's end-of-sequence token); `toolbox`: its environments are closed with the loop."""

    def __init__(
        self,
        backend: RolloutBackend,
        processing_class,
        tokenizer,
        settings: ToolLoopSettings,
        chat_template_kwargs: dict | None = None,
        *,
        tools: list[dict] | None = None,
        accelerator=None,
        end_ids: list[int] | None = None,
        toolbox=None,
    ):
        self.backend = backend
        self.processing_class = processing_class
        self.tokenizer = tokenizer
        self.settings = settings
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.tools = tools
        self.accelerator = accelerator
        self.end_ids = set(end_ids or [tokenizer.eos_token_id])
        self.toolbox = toolbox
        self.takes_budgets = takes_budgets(backend)
        if not self.takes_budgets:
            logger.info(
                f"The rollout backend {type(backend).__name__}'s `generate` takes no `max_new_tokens`: each tool turn's "
                "reply is generated to `max_completion_length` and then cut to the room its trajectory has left. Add "
                "`max_new_tokens=None` (a budget per prompt) to `generate` to decode only that room."
            )
        self.runner = ToolRunner(settings.call_timeout)  # one event loop for the run's tool calls

    def run(self, model, prompt_ids: list[list[int]], num_generations: int, step: int, toolsets: list[dict]):
        """The trajectories of `prompt_ids` (each row's callables in `toolsets`), as `Rollouts` with the tool mask,
        the round's tool stats and which trajectories were cut."""
        first = self.backend.generate(model, prompt_ids, num_generations, step)
        completions = [list(ids) for ids in first.completions]
        logprobs = None if first.logprobs is None else [list(row) for row in first.logprobs]
        masks = [[1] * len(ids) for ids in completions]
        turn_start = [0] * len(completions)
        unanswered = [False] * len(completions)  # ended with a call that was not answered (iteration or length limit)
        stats = ToolStats()
        iteration, active = 0, range(len(completions))
        while True:  # a trajectory that does not continue in one round is finished: its last turn is never rerun
            continuing = []
            for index in (i for i in active if self._ended(completions[i])):
                prefix = prompt_ids[index] + completions[index][: turn_start[index]]
                schemas = getattr(toolsets[index], "schemas", self.tools)  # the row's own tools type its arguments
                message = parse_turn(self.tokenizer, completions[index][turn_start[index] :], prefix, schemas)
                if self._done(iteration):
                    unanswered[index] = bool(message.get("tool_calls") or message.get(MALFORMED))
                    continue
                results = self._results(message, toolsets[index])
                if not results:
                    continue
                stats.add(results)
                messages = [r.message for r in results]
                spec = (self.processing_class, self.tokenizer, messages, self.chat_template_kwargs, self.end_ids)
                suffix = tool_suffix_ids(*spec)
                if len(completions[index]) + len(suffix) >= self.settings.max_completion_length:
                    unanswered[index] = True  # no room for a reply after the results: it ends with its call
                    continue
                completions[index] += suffix
                masks[index] += [0] * len(suffix)
                if logprobs is not None:
                    logprobs[index] += [float("nan")] * len(suffix)  # no engine log-prob: the engine did not sample it
                turn_start[index] = len(completions[index])
                continuing.append(index)
            most = self._most(len(continuing))
            if not most:
                break
            replies = self._generate(model, prompt_ids, completions, continuing, most, step)
            for position, index in enumerate(continuing):
                reply = list(replies.completions[position])  # within the room left (`_generate`'s budgets)
                completions[index] += reply
                masks[index] += [1] * len(reply)
                if logprobs is not None:
                    logprobs[index] += list(replies.logprobs[position])[: len(reply)]
            iteration, active = iteration + 1, continuing
        truncated = [cut or not self._ended(ids) for cut, ids in zip(unanswered, completions, strict=True)]
        return Rollouts(completions, logprobs, masks, stats, truncated)

    def _done(self, iteration: int) -> bool:
        limit = self.settings.max_iterations
        return limit is not None and iteration >= limit

    def _ended(self, completion: list[int]) -> bool:
        """A turn that stopped on its end token (a turn cut by the length limit holds no complete call)."""
        return bool(completion) and completion[-1] in self.end_ids

    def _results(self, message: dict, tools: dict) -> list[ToolResult]:
        if message.get(MALFORMED):
            return [failure("unknown", f"Malformed tool call, it could not be parsed: {message[MALFORMED][:200]!r}")]
        return call_tools(message.get("tool_calls") or [], tools, self.runner)

    def close(self) -> None:
        """At the end of training (on error too): the environments' `close()`, then the tools' event loop."""
        try:
            if self.toolbox is not None:
                self.toolbox.close(self.runner.await_)
        finally:
            self.runner.close()

    def _most(self, count: int) -> int:
        """The most trajectories any process continues this round (each process then calls the backend with that
        many prompts; collective with several processes)."""
        if self.accelerator is None or self.accelerator.num_processes == 1:
            return count
        counts = self.accelerator.gather(torch.tensor([count], device=self.accelerator.device))
        return int(counts.max())

    def _generate(self, model, prompt_ids, completions, continuing: list[int], most: int, step: int) -> Rollouts:
        """One reply per continuing trajectory, within the room it has left; padded to `most` prompts with a
        placeholder (a copy of a prompt, 1 token of budget) so every process calls the backend alike."""
        prompts = [prompt_ids[i] + completions[i] for i in continuing]
        budgets = [self.settings.max_completion_length - len(completions[i]) for i in continuing]
        padding = most - len(continuing)
        prompts, budgets = prompts + [prompt_ids[0]] * padding, budgets + [1] * padding
        return generate_within(self.backend, model, prompts, 1, step, budgets, self.takes_budgets)


def check_tools(tools, environment_factory, datasets: list[tuple[str, Any]], async_rollouts: bool):
    """At construction, before any model loads: the run's `Toolbox` (tools described, names unique, environments
    built once), or None without tools. Refuses what a tool run cannot do: text prompts, rows naming no known
    environment, asynchronous rounds."""
    from ..prompts import is_chat
    from ..tools import Toolbox

    if not tools and environment_factory is None:
        return None
    toolbox = Toolbox(tools, environment_factory)
    for name, dataset in datasets:
        if dataset is not None and len(dataset) and not is_chat(dataset[0]["prompt"]):
            raise ValueError(
                f"Tools need chat prompts (lists of messages), but the {name} dataset's prompts are text: write each "
                'prompt as [{"role": "user", "content": ...}] so that tool calls and results can be turns.'
            )
    for name, dataset in datasets if toolbox.multi else []:  # each row names its environment
        if dataset is None or not len(dataset):
            continue
        if "environment" not in dataset.column_names:
            raise ValueError(
                f"`environment_factory` is a dict of environments, so each row of the {name} dataset needs an "
                f"`environment` column naming one of them ({', '.join(map(repr, toolbox.factories))})."
            )
        for index, value in enumerate(dataset["environment"]):
            if value not in toolbox.factories:
                raise ValueError(
                    f"Row {index} of the {name} dataset: `environment={value!r}` is not among the environments of "
                    f"`environment_factory` ({', '.join(map(repr, toolbox.factories))})."
                )
    if async_rollouts:
        raise ValueError(
            "`async_rollouts` cannot be combined with tools: a round generated in the background would have to run "
            "the tools off the training loop, which SDFTTrainer does not do. Set `async_rollouts=False`."
        )
    return toolbox


def prepare_tools(toolbox, processing_class, tokenizer, chat_template_kwargs: dict):
    """Once the tokenizer is there: refuse a chat template without tool calls (`chat_templates.prepare_tool_tokenizer`)
    and put the tools' schemas into `chat_template_kwargs` (the prompts show them). Returns `toolbox`."""
    if toolbox is None:
        return None
    from ..chat_templates import prepare_tool_tokenizer

    prepare_tool_tokenizer(processing_class, tokenizer)
    chat_template_kwargs["tools"] = toolbox.schemas
    return toolbox


def tool_loop(backend, toolbox, processing_class, tokenizer, settings, chat_template_kwargs, accelerator, end_ids):
    """The `ToolCallingLoop` over `backend` for a run with `toolbox`; None without tools."""
    if toolbox is None:
        return None
    spec = (backend, processing_class, tokenizer, settings, chat_template_kwargs)
    return ToolCallingLoop(*spec, tools=toolbox.schemas, accelerator=accelerator, end_ids=end_ids, toolbox=toolbox)


def prompts_with_tools(
    toolbox, processing_class, rows: list[dict], template, limits, chat_template_kwargs, from_teacher, toolsets=None
):
    """`batch.round_prompts` for a run with tools: each row shown its own environment's tools (`environment_factory`
    as a dict: rows are tokenized in one group per environment and put back in order), and each row whose `reset`
    added an observation (`toolsets`, from `Toolbox.start`) checked against the prompt limits (`check_observations`).
    Without a toolbox, exactly `batch.round_prompts`."""
    from ..batch import RoundPrompts
    from ..batch import round_prompts as tokenize

    spec = (template, limits)
    if toolbox is None:
        return tokenize(processing_class, rows, *spec, chat_template_kwargs, from_teacher)
    groups: dict[Any, list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(toolbox.environment_of(row), []).append(index)
    student, teacher, generation, shown = ([None] * len(rows) for _ in range(4))
    for name, indices in groups.items():
        kwargs = {**chat_template_kwargs, "tools": toolbox.schemas_for(name)}
        group = [rows[i] for i in indices]
        check_observations(
            processing_class, group, [toolsets[i] for i in indices] if toolsets else None, limits, kwargs
        )
        prompts, generation_prompts = tokenize(processing_class, group, *spec, kwargs, from_teacher)
        for position, index in enumerate(indices):
            student[index], teacher[index] = prompts.student[position], prompts.teacher[position]
            generation[index], shown[index] = prompts.generation[position], generation_prompts[position]
    return RoundPrompts(student, teacher, generation), shown


def check_observations(processing_class, rows: list[dict], toolsets, limits, chat_template_kwargs) -> None:
    """Refuse a row whose prompt an environment's `reset` observation made longer than a prompt limit (`limits`:
    student, teacher): the prompt would be cut from the left, and the start it loses holds the tools' descriptions.
    The prompt lengths were checked at construction, before any `reset`; this is the same check after it."""
    from ..batch import tokenize_prompts

    limit = min((value for value in limits if value is not None), default=None)
    observed = [index for index, toolset in enumerate(toolsets or []) if getattr(toolset, "observed", False)]
    if limit is None or not observed:
        return
    lengths = [
        len(ids)
        for ids in tokenize_prompts(processing_class, [rows[i]["prompt"] for i in observed], None, chat_template_kwargs)
    ]
    for index, length in zip(observed, lengths, strict=True):
        if length > limit:
            environment = type(toolsets[index].environment).__name__
            field = "max_prompt_length" if limits[0] == limit else "max_teacher_prompt_length"
            shown = str(rows[index]["prompt"][0].get("content"))[:60]
            raise ValueError(
                f"{environment}.reset returned an observation that makes the prompt {length} tokens long (the row "
                f"whose prompt begins {shown!r}), over `{field}={limit}`: the prompt would be cut from the left, "
                f"losing the tools' descriptions. Return a shorter observation from `reset`, or raise `{field}` "
                f"to at least {length}."
            )
