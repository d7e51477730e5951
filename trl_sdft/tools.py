"""Tools a rollout may call, and what calling them returns. Plain Python: no model, no tokenizer, no torch.

The names and meanings are TRL GRPO's: `tools` is a list of callables (sync or async) whose name, type hints and
docstring describe them to the model; `environment_factory` is a callable returning an object with a `reset(**row)`
method, whose other public methods are tools too. Each rollout gets its own environment (`Toolbox.start`), reset with
its dataset row; a string that `reset` returns is appended to the row's last prompt message.

A call that cannot run (unknown tool, arguments that do not match the signature, a tool that raises, a call that is
not a function call) does not stop training: its error text becomes the tool's result, as in TRL, and it counts as a
failure (`tools/failure_frequency`).
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

RESERVED_METHODS = ("reset", "get_reward", "close")  # lifecycle, not tools


def tool_name(tool: Callable) -> str:
    return getattr(tool, "__name__", type(tool).__name__)


def tool_schema(tool: Callable, owner: str = "`tools`") -> dict:
    """The JSON schema the chat template shows the model (transformers' `get_json_schema`); a tool it cannot describe
    is refused here, at construction, with its name."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(tool)
    except Exception as error:  # DocstringParsingException, TypeHintParsingException
        raise ValueError(
            f"Tool {tool_name(tool)!r} (from {owner}) cannot be described to the model: {error} Give it type hints "
            "and a Google-style docstring with an `Args:` section, as transformers' `get_json_schema` needs."
        ) from None


def _refuse_repeated_names(tools: list[Callable], where: str) -> None:
    """Calls find a tool by name: of two tools with one name, the model would be shown both and reach only one."""
    names = [tool_name(tool) for tool in tools]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        holders = [getattr(tool, "__module__", None) or "?" for tool in tools if tool_name(tool) == repeated[0]]
        raise ValueError(
            f"Two tools of {where} share the name {repeated[0]!r} (from {', '.join(holders)}): the model calls tools by "
            "name, so each name must be unique. Rename one (e.g. with a wrapper function)."
        )


def environment_methods(environment: Any) -> list[Callable]:
    """The public methods of an environment (listed on its class, so that properties are not evaluated), without
    `reset`, `get_reward` and `close` (lifecycle)."""
    names = [name for name, _ in inspect.getmembers(type(environment), predicate=inspect.isfunction)]
    return [getattr(environment, name) for name in names if name not in RESERVED_METHODS and not name.startswith("_")]


class Toolbox:
    """The run's tools: the standalone `tools` plus, per rollout, the methods of its own environment.

    `environment_factory` is one callable, or (TRL GRPO's multi-environment form) a dict of them by name: each row's
    `environment` column then picks its environment, and its prompt shows that environment's tools only."""

    def __init__(self, tools: list[Callable] | None = None, environment_factory: Callable | dict | None = None):
        tools = list(tools or [])
        for tool in tools:
            if not callable(tool):
                raise ValueError(f"`tools` must hold callables; got {tool!r} ({type(tool).__name__}).")
        self.multi = isinstance(environment_factory, dict)
        factories = environment_factory if self.multi else {None: environment_factory}
        factories = {name: factory for name, factory in factories.items() if factory is not None}
        for name, factory in factories.items():
            if not callable(factory):
                where = "`environment_factory`" + ("" if name is None else f"[{name!r}]")
                raise ValueError(f"{where} must be callable; got {type(factory).__name__}.")
        if self.multi and not factories:
            raise ValueError("`environment_factory` is an empty dict: give at least one environment factory.")
        self.tools, self.factories = tools, factories
        self._pools: dict[Any, list[Any]] = {}
        _refuse_repeated_names(tools, "`tools`")
        self._schemas = {None: [tool_schema(tool) for tool in tools]}
        for name, factory in factories.items():  # one instance of each, probed for its methods, seeds its pool
            where = "`environment_factory`" + ("" if name is None else f"[{name!r}]")
            try:
                probe = factory()
            except Exception as error:  # the user's constructor: named here, at construction
                raise ValueError(
                    f"{where} raised {type(error).__name__} when called to build an environment: {error}"
                ) from error
            if not callable(getattr(probe, "reset", None)):
                raise ValueError(
                    f"The environment `environment_factory` returned ({type(probe).__name__}) has no `reset` method: "
                    "define `reset(self, **row)`, which starts an episode and may return text appended to the prompt."
                )
            self._pools[name] = [probe]
            methods = environment_methods(probe)
            names = [tool_name(tool) for tool in tools + methods]
            _refuse_repeated_names(tools + methods, f"`tools` and {where}'s methods")
            if not names:
                raise ValueError("`environment_factory`'s environment has no public method to use as a tool.")
            self._schemas[name] = self._schemas[None] + [
                tool_schema(method, "`environment_factory`") for method in methods
            ]
        # Every tool any rollout may call (parsing types arguments by name; prompt lengths are checked against it).
        self.schemas = list(
            {schema["function"]["name"]: schema for group in self._schemas.values() for schema in group}.values()
        )

    def schemas_for(self, environment: Any) -> list[dict]:
        """The tools a row of `environment` (its `environment` value; None with one factory) is shown."""
        return self._schemas[environment if self.multi else None]

    def environment_of(self, row: dict) -> Any:
        """The row's environment name (the `environment` column in the multi-environment form), checked."""
        if not self.multi:
            return None
        name = row.get("environment")
        if name not in self.factories:
            raise ValueError(
                f"A row has `environment={name!r}`, which is not among the environments of `environment_factory`: "
                f"{', '.join(map(repr, self.factories))}."
            )
        return name

    def start(self, rows: list[dict]) -> tuple[list[dict], list[dict[str, Callable]]]:
        """One episode per row: the rows (prompts with the observations their environments' `reset` returned) and
        each rollout's tools by name. Environments are pooled and reset, not rebuilt."""
        if not self.factories:
            tools = Toolset({tool_name(tool): tool for tool in self.tools}, self._schemas[None])
            return rows, [tools] * len(rows)
        started, toolsets, handed = [], [], {}
        for row in rows:
            name = self.environment_of(row)
            pool, index = self._pools[name], handed.get(name, 0)
            if index == len(pool):
                pool.append(self.factories[name]())
            handed[name] = index + 1
            environment = pool[index]
            kwargs = {key: value for key, value in row.items() if key != "environment"} if self.multi else row
            try:
                observation = environment.reset(**kwargs)
            except Exception as error:  # the user's environment: named, with the row, not a bare traceback
                shown = str(row.get("prompt"))[:80]
                raise ValueError(
                    f"`environment_factory`'s {type(environment).__name__}.reset raised {type(error).__name__}: "
                    f"{error} (for the row whose prompt begins {shown!r})."
                ) from error
            if observation is not None:
                row = {**row, "prompt": with_observation(row["prompt"], observation)}
            started.append(row)
            callables = {tool_name(tool): tool for tool in self.tools + environment_methods(environment)}
            toolsets.append(Toolset(callables, self.schemas_for(name), environment, observation is not None))
        return started, toolsets

    def close(self, run_awaitable: Callable | None = None) -> None:
        """Close every environment built (its `close()`, if it has one; an async one is awaited with
        `run_awaitable`). A close that fails is logged, not raised: the run is over either way."""
        import logging

        for pool in self._pools.values():
            for environment in pool:
                close = getattr(environment, "close", None)
                if not callable(close):
                    continue
                try:
                    result = close()
                    if inspect.isawaitable(result):
                        run_awaitable(result) if run_awaitable else asyncio.run(_awaited(result))
                except Exception as error:  # noqa: BLE001 (the user's cleanup: reported, never fatal)
                    logging.getLogger(__name__).warning(
                        f"Closing the environment {type(environment).__name__} failed: {type(error).__name__}: {error}"
                    )
        self._pools = {name: [] for name in self._pools}  # a later `train()` builds fresh ones


class Toolset(dict):
    """One rollout's tools by name, with `schemas`, the descriptions its prompt showed: its calls' arguments are typed
    by them (two environments may each have a `lookup`, with different argument types). `environment`: the instance
    that serves the rollout (None without one); `observed`: its `reset` added text to the prompt."""

    def __init__(self, tools: dict[str, Callable], schemas: list[dict], environment: Any = None, observed=False):
        super().__init__(tools)
        self.schemas = schemas
        self.environment = environment
        self.observed = observed


def with_observation(prompt: list[dict], observation: Any) -> list[dict]:
    """The prompt with `observation` appended to its last message (a new list; the row is left as it was)."""
    last = prompt[-1]
    return [*prompt[:-1], {**last, "content": f"{last.get('content') or ''}{observation}"}]


class ToolResult(NamedTuple):
    """One call's result: the tool message to append, and whether the call failed."""

    message: dict
    failed: bool


def call_tools(tool_calls: list[Any], tools: dict[str, Callable], runner: ToolRunner | None = None) -> list[ToolResult]:
    """Run a turn's tool calls concurrently; each gives one `tool` message, in the order of the calls. Failures (and,
    with a `runner` that has a timeout, calls that take too long) become the message's content. Without a `runner`,
    one is started for these calls alone."""
    if runner is not None:
        return runner.run(tool_calls, tools)
    runner = ToolRunner()
    try:
        return runner.run(tool_calls, tools)
    finally:
        runner.close()


def _prepare(call: Any, tools: dict[str, Callable]) -> tuple[str, Callable, dict] | ToolResult:
    """(name, tool, arguments) of a call that can run, or the failure that answers it."""
    if (
        not isinstance(call, dict)
        or call.get("type", "function") != "function"
        or "function" in call
        and not (isinstance(call["function"], dict))
    ):
        kind = call.get("type") if isinstance(call, dict) else type(call).__name__
        return failure("unknown", f"Unsupported tool call: {kind!r} is not a function call.")
    function = call.get("function", call)
    name, arguments = function.get("name"), function.get("arguments") or {}
    if isinstance(arguments, str):  # some templates give the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as error:
            return failure(str(name), f"The arguments of {name!r} are not valid JSON: {error}.")
    if not isinstance(name, str) or name not in tools:
        known = ", ".join(sorted(tools))
        return failure(str(name), f"Tool {name!r} not found. Available tools: {known}.")
    if not isinstance(arguments, dict):
        return failure(name, f"The arguments of {name!r} must be a JSON object, got {type(arguments).__name__}.")
    tool = tools[name]
    try:
        inspect.signature(tool).bind(**arguments)
    except TypeError as error:
        return failure(
            name, f"Arguments {json.dumps(arguments)} do not match {name}{inspect.signature(tool)}: {error}."
        )
    return name, tool, arguments


async def _awaited(awaitable):
    return await awaitable


class ToolRunner:
    """Runs tool calls for the run's life on one event loop, in one daemon thread (TRL's pattern): async tools and
    environments keep loop-bound state between calls (a client session, a lock), a turn's calls run concurrently
    (async ones on the loop, sync ones each on a daemon thread of its own), and each call gets at most `timeout`
    seconds (None: no limit), after which its result is an error and training goes on. A sync tool that never
    returns keeps its thread, which does not hold the process at exit. `close` stops the loop."""

    def __init__(self, timeout: float | None = None):
        self.timeout = timeout
        self._loop = None
        self._thread = None

    def run(self, tool_calls: list[Any], tools: dict[str, Callable]) -> list[ToolResult]:
        if not tool_calls:
            return []
        loop = self._started()

        async def turn():
            return await asyncio.gather(*(self._one(call, tools) for call in tool_calls))

        return asyncio.run_coroutine_threadsafe(turn(), loop).result()

    def await_(self, awaitable) -> Any:
        """The value of `awaitable`, awaited on the runner's loop (an environment's async `close`, say)."""
        return asyncio.run_coroutine_threadsafe(_awaited(awaitable), self._started()).result()

    def close(self) -> None:
        loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()

    def _started(self):
        if self._loop is None:
            import threading

            ready = threading.Event()
            loop = asyncio.new_event_loop()

            def serve():
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            self._thread = threading.Thread(target=serve, name="trl-sdft-tools", daemon=True)
            self._thread.start()
            ready.wait()
            self._loop = loop
        return self._loop

    async def _one(self, call: Any, tools: dict[str, Callable]) -> ToolResult:
        prepared = _prepare(call, tools)
        if isinstance(prepared, ToolResult):
            return prepared
        name, tool, arguments = prepared
        try:
            if inspect.iscoroutinefunction(tool):
                pending = tool(**arguments)
            else:
                pending = _in_thread(asyncio.get_running_loop(), tool, arguments)
            result = await asyncio.wait_for(pending, self.timeout)
            if inspect.isawaitable(result):  # a sync callable that returned a coroutine
                result = await asyncio.wait_for(result, self.timeout)
            content = _text(result)  # inside the boundary: a result that cannot be written is the call's failure
        except asyncio.TimeoutError:
            return failure(name, f"The call to {name!r} took longer than {self.timeout} s (`tool_call_timeout`).")
        except Exception as error:  # the tool's own error: the model reads it, training goes on
            return failure(name, f"{type(error).__name__}: {error}")
        return ToolResult({"role": "tool", "name": name, "content": content}, False)


def _in_thread(loop, tool: Callable, arguments: dict):
    """A future of `tool(**arguments)` run on a daemon thread of its own (a hung tool never blocks the loop or the
    process's exit)."""
    import threading

    future = loop.create_future()

    def settle(value, error):
        if not future.done():  # a call that timed out was cancelled
            future.set_exception(error) if error is not None else future.set_result(value)

    def work():
        try:
            value, error = tool(**arguments), None
        except BaseException as caught:  # handed to the loop, where the call's boundary turns it into a failure
            value, error = None, caught
        try:
            loop.call_soon_threadsafe(settle, value, error)
        except RuntimeError:  # the loop was closed meanwhile (the run ended): nobody waits for this result
            pass

    threading.Thread(target=work, name="trl-sdft-tool", daemon=True).start()
    return future


def _text(result: Any) -> str:
    """A result as the model reads it: text as is, dicts and lists as JSON (numpy scalars, dates, sets and tuples
    written as their values, lists or text), anything else `str()`."""
    if isinstance(result, str):
        return result
    if not isinstance(result, dict | list | tuple):
        return str(result)
    try:
        return json.dumps(result, default=_json_value)
    except (TypeError, ValueError):  # keys JSON cannot have (tuples), circular references: the text of the object
        return str(result)


def _json_value(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        return value.item()  # a numpy or torch scalar
    if hasattr(value, "tolist") and callable(value.tolist):
        return value.tolist()
    if hasattr(value, "isoformat") and callable(value.isoformat):
        return value.isoformat()
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    return str(value)


def failure(name: str, error: str) -> ToolResult:
    """A failed call: its error, as JSON, is the tool's result."""
    return ToolResult({"role": "tool", "name": name, "content": json.dumps({"error": error})}, True)


@dataclass
class ToolStats:
    """Calls and failed calls over one round, for `tools/call_frequency` (calls per rollout) and
    `tools/failure_frequency` (failed calls per call)."""

    calls: int = 0
    failures: int = 0

    def add(self, results: list[ToolResult]) -> None:
        self.calls += len(results)
        self.failures += sum(result.failed for result in results)
