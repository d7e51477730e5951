"""Asynchronous rounds (`async_rollouts`): the vLLM server generates round k+1 while the trainer learns on round k.

A synchronous step costs generation + training; here it costs about max(generation, training). Two pieces:

- `RoundLookahead` stands between the training loop and its loader batches, so that the rows of the next round can be
  read before the loop reaches them. When the next round lies in the next epoch, that epoch's loader iterator is
  started early and handed to the loop in place of the fresh one it makes (which is never advanced), so the loop
  sees exactly the batches, in the order, it would have seen.
- `AsyncRounds` keeps the one round in flight. At each round boundary, on every process alike: collect the round
  generated ahead (or generate it now if there is none, it is for other rows, or it would be trained on weights more
  than `max_staleness` optimizer steps newer than its own), then push the current weights and send the next round's
  prompts, then train. Weights therefore never change under a running round.

The rollouts of a round sent ahead come from the weights of the step before: the trainer weights each token by the
ratio of the current student to the server's own log-prob of it (the rollout policy), capped at `distillation_is_clip`
(`importance.token_weights`). The teacher is whatever it is when the round is trained: the base weights, the live
student, or the EMA teacher of the current step.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..batch import RoundPrompts
from .base import BackgroundRollouts, PendingRound, Rollouts


class _Epoch:
    """One epoch of loader batches as the training loop reads them, some possibly read ahead already."""

    def __init__(self, owner: RoundLookahead, source: Iterator, loop_iterator: Iterator, number: int):
        self.owner = owner
        self.number = number  # the training loop's epoch index
        self.source = source  # where the batches come from
        self.loop_iterator = loop_iterator  # the iterator the loop made for this epoch (identifies it)
        self.ahead: deque = deque()  # read from `source`, not yet handed to the loop
        self.done = False

    def __iter__(self):
        return self

    def __next__(self):
        if self.ahead:
            item = self.ahead.popleft()
        elif not self.pull():
            raise StopIteration
        else:
            item = self.ahead.popleft()
        self.owner.handed_out(item)
        return item

    def pull(self) -> bool:
        if self.done:
            return False
        try:
            self.ahead.append(next(self.source))
        except StopIteration:
            self.done = True
            return False
        return True


class RoundLookahead:
    """The loader batches of a training run, by position (0: the first batch the loop reads in this run)."""

    def __init__(self, loader):
        self.loader = loader
        self.epochs: list[_Epoch] = []
        self.current = -1  # the epoch the loop reads
        self.count = 0  # batches handed to the loop
        self.recent: dict[int, Any] = {}  # handed out, maybe not trained on yet (the loop reads a whole step ahead)

    def loop_iterator(self, iterator: Iterator, epoch: int = 0) -> Iterator:
        """What the loop reads in place of `iterator`, the iterator it made (or is reading) for epoch `epoch`."""
        if self.current >= 0 and self.epochs[self.current].loop_iterator is iterator:
            return self.epochs[self.current]
        self.current += 1
        if self.current < len(self.epochs):  # started ahead: the loop's own iterator is dropped unread
            self.epochs[self.current].loop_iterator = iterator
        else:
            self.epochs.append(_Epoch(self, iterator, iterator, epoch))
        return self.epochs[self.current]

    def handed_out(self, item) -> None:
        self.recent[self.count] = item
        self.count += 1

    def item(self, position: int):
        """The batch at `position`, read ahead of the loop if needed; None past the end of the next epoch."""
        if position < self.count:
            return self.recent.get(position)
        if self.current < 0:
            return None
        offset, index = position - self.count, self.current
        while True:
            epoch = self.epochs[index]
            while len(epoch.ahead) <= offset and epoch.pull():
                pass
            if len(epoch.ahead) > offset:
                return epoch.ahead[offset]
            offset -= len(epoch.ahead)
            index += 1
            if index == len(self.epochs):
                if index > self.current + 1:  # never more than one epoch ahead
                    return None
                number = self.epochs[-1].number + 1
                if hasattr(self.loader, "set_epoch"):  # as the loop does before each epoch
                    self.loader.set_epoch(number)
                source = iter(self.loader)
                self.epochs.append(_Epoch(self, source, source, number))

    def forget(self, before: int) -> None:
        for position in [p for p in self.recent if p < before]:
            del self.recent[position]


class _Ahead(NamedTuple):
    position: int
    rows: Any
    prompts: RoundPrompts
    round: PendingRound


class RoundResult(NamedTuple):
    prompts: RoundPrompts
    rollouts: Rollouts
    generated_at: int  # the optimizer step of the weights that generated the round
    metrics: dict[str, float]  # wait_seconds: this process waited for the server; regenerated: 1 if a round sent
    # ahead could not be used


@dataclass(frozen=True)
class AsyncRoundSettings:
    """Completions per prompt, micro-steps per round, the staleness a round may reach (optimizer steps), and the
    optimizer steps a round is trained over."""

    num_generations: int
    generate_every: int
    max_staleness: int
    span: int


class AsyncRounds:
    """The round in flight and the decisions around it (see the module docstring)."""

    def __init__(self, rollout: BackgroundRollouts, accelerator, settings: AsyncRoundSettings):
        self.rollout = rollout
        self.accelerator = accelerator
        self.num_generations = settings.num_generations
        self.generate_every = settings.generate_every  # micro-steps per round
        self.max_staleness = settings.max_staleness
        self.span = settings.span  # optimizer steps a round is trained over
        self.lookahead: RoundLookahead | None = None
        self.origin = 0
        self.ahead: _Ahead | None = None

    def restart(self, loader, micro_step: int) -> None:
        """A new training run (or a resumed one) reads `loader` from micro-step `micro_step`: nothing is in flight.
        With `max_staleness` 0 no round is sent ahead: rounds are generated when they are trained."""
        self.close()
        self.lookahead = RoundLookahead(loader) if self.max_staleness > 0 else None
        self.origin = micro_step

    def loop_iterator(self, iterator: Iterator, epoch: int) -> Iterator:
        return iterator if self.lookahead is None else self.lookahead.loop_iterator(iterator, epoch)

    def _all(self, flag: bool) -> bool:
        """`flag` on every process (the decisions around collective calls must agree)."""
        if self.accelerator.num_processes == 1:
            return flag
        flags = self.accelerator.gather(torch.tensor([int(flag)], device=self.accelerator.device))
        return bool(flags.min().item())

    def round(
        self, rows, micro_step: int, step: int, last_micro_step: int, prepare: Callable[[Any], RoundPrompts]
    ) -> RoundResult:
        """The rollouts of the round that starts at `micro_step` (optimizer step `step`) with `rows`; sends the next
        round, if there is one before `last_micro_step`, to the server before returning."""
        position = micro_step - self.origin
        ahead, self.ahead = self.ahead, None
        fits = (
            ahead is not None
            and ahead.position == position
            and ahead.rows == rows
            and step - ahead.round.step + self.span - 1 <= self.max_staleness
        )
        started = time.perf_counter()
        fits = self._all(fits)
        if fits:
            prompts, rollouts, generated_at = ahead.prompts, self.rollout.finish(ahead.round), ahead.round.step
        else:
            if ahead is not None:  # collected and dropped: every process takes part in the round's broadcast
                self.rollout.finish(ahead.round)
            prompts = prepare(rows)
            rollouts = self.rollout.finish(self.rollout.start(prompts.generation, self.num_generations, step))
            generated_at = step
        waited = time.perf_counter() - started
        following = position + self.generate_every
        if self.lookahead is not None and micro_step + self.generate_every < last_micro_step:
            next_rows = self.lookahead.item(following)
            if self._all(next_rows is not None):
                next_prompts = prepare(next_rows)
                pending = self.rollout.start(next_prompts.generation, self.num_generations, step)
                self.ahead = _Ahead(following, next_rows, next_prompts, pending)
            self.lookahead.forget(position)
        regenerated = float(ahead is not None and not fits)
        return RoundResult(prompts, rollouts, generated_at, {"wait_seconds": waited, "regenerated": regenerated})

    def close(self) -> None:
        """End of a run: a round still in flight is waited for and dropped."""
        self.ahead = None
        self.rollout.close()
