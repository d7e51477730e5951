"""The "vllm" rollout backend: rollouts from a colocated or a server vLLM engine, and the teacher scored on the server.

Built by the registry in `rollouts/base.py` only when asked for, so that `import trl_sdft` never imports vLLM. The engine
is TRL's generation layer adapted in `vllm_engine.py`; this module decides when weights are synced (once per optimizer
step), sends server rounds from a background thread (`BackgroundRollouts`, for `async_rollouts`), cuts completions to
their budgets and end ids, and checks before training that vLLM scores a probe sentence like the trainer model does. A
server that stops answering mid-training raises `VLLMServerError` with what to do.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager

import torch
from accelerate.utils import broadcast_object_list, gather_object

from .. import sharding
from ..losses import ServerTeacherScores
from ..utils import tokenizer_of, unwrap
from .base import PendingRound, RolloutContext, Rollouts, VLLMServerError, VLLMSettings, cut_at_eos, within_budgets
from .vllm_engine import (
    PROBE_TEXT,
    PROBE_TOLERANCE,
    SDFTVLLMGeneration,
    VLLMClient,
    engine_dtype,
    tolerate_vllm_version,
)


def engine_options(engine: VLLMSettings) -> dict:
    """The engine's options as `SDFTVLLMGeneration` takes them: `VLLMSettings` fields are named after TRL's
    `VLLMGeneration` arguments (plus `enforce_eager` and `sync_dir`, ours); `dtype` and `precision` make one dtype
    (`engine_dtype`)."""
    return {
        field.name: getattr(engine, field.name)
        for field in dataclasses.fields(engine)
        if field.name not in ("dtype", "precision")
    }


def server_error(base_url: str, doing: str, error: Exception) -> VLLMServerError:
    return VLLMServerError(
        f"The vLLM server at {base_url} failed while {doing} ({type(error).__name__}: {str(error)[:300]}). Training "
        "stopped before this step's update; checkpoints already written are intact. Check the server's log, restart "
        "it, and resume with `resume_from_checkpoint`."
    )


def distinct_prompts(prompts: list[list[int]], num_generations: int) -> list[list[int]]:
    """The distinct prompts of a round whose prompts come in runs of `num_generations` equal ones (as the trainer's
    sampler repeats them), for a server asked for `num_generations` completions per prompt. Anything else would
    silently train on the completions of other prompts, so it is refused."""
    groups = [prompts[i : i + num_generations] for i in range(0, len(prompts), num_generations)]
    for index, group in enumerate(groups):
        if len(group) != num_generations or any(prompt != group[0] for prompt in group):
            raise ValueError(
                f"server rollouts need each prompt repeated `num_generations={num_generations}` times in a row; "
                f"prompts {index * num_generations}..{index * num_generations + len(group) - 1} of {len(prompts)} "
                "are not one prompt repeated. Repeat each prompt `num_generations` times (the trainer's sampler does), "
                "or pass `num_generations=1`."
            )
    return [group[0] for group in groups]


class VLLMRollout:
    """The "vllm" backend: rollouts (`RolloutBackend.generate`) and server teacher scores (`TeacherScorer`), with the
    weights synced whenever the optimizer step changed. In server mode a round can be started and collected apart
    (`start`, `finish`, `BackgroundRollouts`), so that the trainer learns while the server generates
    (`async_rollouts`). Reads `context.settings` (and its `vllm` part) only."""

    def __init__(self, context: RolloutContext):
        settings = context.settings
        if settings.vllm is None:
            raise ValueError(
                "The 'vllm' rollout backend needs `RolloutSettings.vllm` (`trl_sdft.settings.vllm_settings(args)`): "
                "set `use_vllm=True`."
            )
        engine = settings.vllm
        model = context.model
        self.settings = settings
        self.model = model
        self.accelerator = context.accelerator
        self.eos_token_ids = list(context.eos_token_ids)
        longest = context.longest_teacher_prompt if settings.generate_from_teacher else context.longest_prompt
        if settings.teacher_on_server:
            longest = max(longest, context.longest_teacher_prompt)
        if engine.mode == "colocate":
            limit = engine.max_model_length
            if limit is None:
                limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
            self._check_length(longest, limit, "`vllm_max_model_length`")
        self.generation = SDFTVLLMGeneration(
            model=model,
            accelerator=context.accelerator,
            processing_class=context.processing_class,
            **engine_options(engine),
            trust_remote_code=settings.trust_remote_code,
            repetition_penalty=settings.repetition_penalty,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k or 0,
            min_p=settings.min_p or 0.0,
            max_completion_length=settings.max_completion_length,
            # 0: the sampled token's only (engine-mismatch correction; async rounds: the rollout policy's log-probs)
            logprobs=0 if settings.engine_logprobs else None,
            generation_kwargs={"stop_token_ids": self.eos_token_ids, **(settings.generation_kwargs or {})},
            dtype=engine_dtype(engine, unwrap(model)),
        )
        if engine.mode == "server":
            self._check_length(longest, self.generation.server_max_model_len, "the server's `--max-model-len`")
        self.teacher_client = None
        if settings.teacher_on_server:
            self.teacher_client = getattr(self.generation, "vllm_client", None)
            if self.teacher_client is None:
                with tolerate_vllm_version():
                    self.teacher_client = VLLMClient(
                        base_url=self.generation.base_url, connection_timeout=engine.server_timeout
                    )
        self.synced_step = None
        self._inflight: Future | None = None  # the round the server is generating (main process, server mode)
        self._executor: ThreadPoolExecutor | None = None
        # Before training: push the trainer's weights once and check that vLLM now scores like the trainer model.
        try:
            self.sync(step=-1)
        except VLLMServerError as error:
            raise VLLMServerError(
                f"vLLM did not accept the trainer's weights ({model.name_or_path!r}) before training: it probably "
                f"serves a different model; start it with the trainer's model. {error}"
            ) from error
        differences = self.logprob_differences()
        gap = sum(differences) / len(differences)
        if gap > PROBE_TOLERANCE:
            raise VLLMServerError(
                f"After loading the trainer's weights, vLLM's log-probs differ from the trainer model's by {gap:.3f} "
                f"nats per token on a probe sentence (same model: < 0.05). vLLM runs a different model or config than "
                f"the trainer ({model.name_or_path!r}): start it with the trainer's model."
            )
        self.probe_gap = gap

    def describe(self) -> str:
        """The line the trainer logs at start: the mode, how weights are synced, and the probe check's gap."""
        return (
            f"vLLM ({self.settings.vllm.mode}, weight sync: {self.generation.sync_method}) scores a probe like the "
            f"trainer model within {self.probe_gap:.2e} nats per token."
        )

    def _check_length(self, longest_prompt: int, limit: int | None, field: str) -> None:
        needed = longest_prompt + self.settings.max_completion_length
        if limit is not None and needed > limit:
            raise ValueError(
                f"vLLM's context ({limit} tokens, {field}) is shorter than the longest prompt ({longest_prompt} "
                f"tokens) + max_completion_length ({self.settings.max_completion_length}) = {needed}. Raise {field} to "
                f"at least {needed}, or lower max_completion_length / max_prompt_length / max_teacher_prompt_length."
            )

    def _server(self) -> bool:
        return self.settings.vllm.mode == "server"

    @contextmanager
    def _server_errors(self, doing: str):
        """A failing server call becomes a `VLLMServerError` saying what to do; colocated errors pass unchanged."""
        try:
            yield
        except VLLMServerError:
            raise
        except Exception as error:
            if not self._server():
                raise
            raise server_error(self.generation.base_url, doing, error) from error

    def sync(self, step: int) -> None:
        """Push the student's weights to vLLM unless they are already there for this optimizer step (after the round
        the server may still be generating: weights never change under a running round)."""
        if self.synced_step == step:
            return
        if self._inflight is not None:
            wait([self._inflight])
        with self._server_errors("loading the trainer's weights"):
            self.generation.sync_weights()
        self.synced_step = step

    def generate(
        self,
        model,
        prompt_ids: list[list[int]],
        num_generations: int,
        step: int,
        max_new_tokens: list[int] | None = None,
    ) -> Rollouts:
        """Completions sampled by vLLM with the weights of optimizer step `step` (synced from `self.model` first;
        `model`, the trainer's wrapped model, is not needed), with vLLM's log-probs of their tokens when the run
        corrects for the engine's mismatch. With budgets (`max_new_tokens`, one per prompt) the engine decodes up to the
        largest budget of any process (one sampling config per call: tensor-parallel ranks and the server's single
        request must agree) and each completion is cut to its own."""
        limit = self._call_limit(max_new_tokens)
        if self._server():
            return within_budgets(self.finish(self.start(prompt_ids, num_generations, step, limit)), max_new_tokens)
        self.sync(step)
        g, full = self.generation, self.generation.max_completion_length
        g.max_completion_length = full if limit is None else min(full, limit)
        try:
            _, completions, logprobs, _ = g.generate(prompt_ids, None, num_generations)
        finally:
            g.max_completion_length = full
        return within_budgets(self._rollouts(completions, logprobs), max_new_tokens)

    def _call_limit(self, budgets: list[int] | None) -> int | None:
        """The most tokens any process's prompts may get in this call (collective with several processes)."""
        if budgets is None:
            return None
        local = max(budgets, default=1)
        return max(gather_object([local])) if self.accelerator.num_processes > 1 else local

    def _rollouts(self, completions, logprobs) -> Rollouts:
        completions = cut_at_eos(completions, self.eos_token_ids)
        if logprobs is None:
            return Rollouts(completions)
        # One entry per token (the sampled token's log-prob first); None where vLLM returned NaN.
        sampled = [
            [float("nan") if top[0] is None else top[0] for top in row[: len(ids)]]
            for row, ids in zip(logprobs, completions, strict=True)
        ]
        return Rollouts(completions, sampled)

    def start(
        self, prompt_ids: list[list[int]], num_generations: int, step: int, max_new_tokens: int | None = None
    ) -> PendingRound:
        """Server mode, every process: push the weights of optimizer step `step`, gather every process's prompts and
        send them to the server from a background thread of the main process (at most `max_new_tokens` tokens each,
        the same on every process; None: `max_completion_length`). Returns at once; `finish` collects."""
        self.sync(step)
        prompts = distinct_prompts(gather_object(prompt_ids), num_generations)  # every process checks alike
        future = None
        if self.accelerator.is_main_process:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trl-sdft-rollout")
            future = self._executor.submit(self._server_generate, prompts, num_generations, max_new_tokens)
            self._inflight = future
        return PendingRound(future, len(prompt_ids), step)

    def finish(self, pending: PendingRound) -> Rollouts:
        """Every process: wait for the round `start` sent, and take this process's share of it. A server that failed
        meanwhile raises `VLLMServerError` on every process."""
        payload = [None]
        if self.accelerator.is_main_process:
            try:
                payload = [("ok", pending.future.result())]
            except Exception as error:
                payload = [("error", f"{type(error).__name__}: {str(error)[:300]}")]
            if self._inflight is pending.future:
                self._inflight = None
        broadcast_object_list(payload, from_process=0)
        status, result = payload[0]
        if status == "error":
            raise server_error(self.generation.base_url, "generating completions", RuntimeError(result))
        completions, logprobs = result
        share = slice(
            self.accelerator.process_index * pending.count, (self.accelerator.process_index + 1) * pending.count
        )
        return self._rollouts(completions[share], None if logprobs is None else logprobs[share])

    def _server_generate(self, prompts: list[list[int]], num_generations: int, max_new_tokens: int | None = None):
        """The server call (main process, background thread): `num_generations` completions per distinct prompt, as
        TRL's `VLLMGeneration.generate` asks for them."""
        g = self.generation
        limit = g.max_completion_length if max_new_tokens is None else min(g.max_completion_length, max_new_tokens)
        output = g.vllm_client.generate(
            prompts=prompts,
            n=num_generations,
            repetition_penalty=g.repetition_penalty,
            temperature=g.temperature,
            top_p=g.top_p,
            top_k=g.top_k,
            min_p=0.0 if g.min_p is None else g.min_p,
            max_tokens=limit,
            logprobs=g.logprobs,
            structured_outputs_regex=g.structured_outputs_regex,
            generation_kwargs=g.generation_kwargs,
        )
        return output["completion_ids"], output["logprobs"]

    def close(self) -> None:
        """Wait for a round still on the server, stop the background thread and delete the temporary weight-sync
        directory (end of training)."""
        if self._inflight is not None:
            wait([self._inflight])
            self._inflight = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        directory = getattr(self.generation, "sync_directory", None)
        if directory is not None:
            directory.remove()

    def teacher_scores(
        self, teacher_input_ids, teacher_attention_mask, mask: torch.Tensor, top: int, step: int
    ) -> ServerTeacherScores:
        """The teacher's log-probs of the completion tokens and its `top` most likely tokens at each completion
        position, scored on the server. `mask` `[B, T]` marks the positions the loss needs."""
        self.sync(step)
        self.accelerator.wait_for_everyone()  # only the main process pushes weights: score after it is done
        batch, num_tokens = mask.shape
        prompt_width = teacher_input_ids.size(1) - num_tokens
        sequences, prompt_lengths = [], []
        for ids, row_mask in zip(teacher_input_ids.tolist(), teacher_attention_mask.tolist(), strict=True):
            sequences.append([t for t, m in zip(ids, row_mask, strict=True) if m])
            prompt_lengths.append(sum(row_mask[:prompt_width]))
        with self._server_errors("scoring the teacher"):
            served = self.teacher_client.get_sequence_logprobs(
                sequences=sequences,
                prompt_lengths=prompt_lengths,
                top_logprobs=top,
                temperature=self.settings.temperature,
            )
        actual = torch.full((batch, num_tokens), float("-inf"))
        topk = torch.full((batch, num_tokens, top), float("-inf"))
        topk_ids = torch.zeros((batch, num_tokens, top), dtype=torch.long)
        for row in range(batch):
            count = min(len(served["actual_logprobs"][row]), num_tokens)
            if count:
                actual[row, :count] = torch.tensor(served["actual_logprobs"][row][:count])[:, 0]
                topk[row, :count] = torch.tensor(served["logprobs"][row][:count])
                topk_ids[row, :count] = torch.tensor(served["logprob_token_ids"][row][:count])
        device = teacher_input_ids.device
        actual, required = actual.to(device), mask.bool()
        if (required & ~torch.isfinite(actual)).any():
            raise RuntimeError(
                "The vLLM server returned no log-prob for a completion token: it was started with too small "
                f"`--max-logprobs` (needs >= {top}); restart it with `--max-logprobs -1`."
            )
        return ServerTeacherScores(
            token_logps=actual,
            topk_logps=topk.to(device),
            topk_ids=topk_ids.to(device),
        )

    @torch.no_grad()
    def logprob_differences(self, sequence: list[int] | None = None) -> list[float]:
        """|log p_vLLM - log p_trainer| at each token of `sequence` (default: a probe sentence), in nats."""
        if sequence is None:
            sequence = tokenizer_of(self.generation.processing_class)(PROBE_TEXT)["input_ids"]
        payload = [None]
        # The trainer's side on every process: a sharded model's forward is a collective (ZeRO-3 before its engine
        # exists: the weights gathered for this one forward).
        model = unwrap(self.model)
        ids = torch.tensor([sequence], device=self.accelerator.device)
        engine = getattr(self.accelerator, "deepspeed_engine_wrapped", None)  # its hooks gather in the forward
        with sharding.gathered(model.parameters() if engine is None else []):
            logits = model(input_ids=ids).logits[0, :-1].float()
        mine = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0].cpu()
        if self.accelerator.is_main_process or not self._server():
            served = torch.tensor(self.generation.prompt_logprobs([sequence])[0])
            payload = [(served - mine).abs().tolist()]
        if self._server():
            broadcast_object_list(payload, from_process=0)
        return payload[0]
