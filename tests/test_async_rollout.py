"""Asynchronous rounds (`async_rollouts`): the lookahead over the loader, the round in flight, staleness, importance
weights from the server's log-probs, resume, a failing server, and the configuration errors. The server is a
deterministic stand-in here (completions from the prompt ids, log-prob -1.5 per token); tests/test_vllm.py runs the
real one."""

import os
import re

import pytest
from datasets import Dataset
from transformers import TrainerCallback

from trl_sdft import SDFTConfig, SDFTTrainer
from trl_sdft.rollouts import PendingRound, Rollouts, VLLMServerError
from trl_sdft.rollouts.async_rounds import RoundLookahead
from trl_sdft.testing import facts_rows

SERVER_LOGP = -1.5


class FakeServer:
    """`VLLMRollout`'s server-mode calls (`start`, `finish`, `generate`, `close`), recording what was sent and when."""

    def __init__(self, fail_at: int | None = None):
        self.sent = []  # (optimizer step of the weights, prompts)
        self.in_flight = self.most_in_flight = 0
        self.fail_at = fail_at  # the round (1-based) whose collection fails, as a server that died

    def start(self, prompt_ids, num_generations, step):
        self.sent.append((step, [tuple(p) for p in prompt_ids]))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        return PendingRound(prompt_ids, len(prompt_ids), step)  # the "future" holds the prompts

    def finish(self, pending):
        self.in_flight -= 1
        if self.fail_at is not None and len(self.sent) >= self.fail_at:
            raise VLLMServerError("The vLLM server at http://127.0.0.1:1 failed while generating completions.")
        completions = [list(prompt[-3:]) for prompt in pending.future]
        return Rollouts(completions, [[SERVER_LOGP] * len(c) for c in completions])

    def generate(self, model, prompt_ids, num_generations, step):
        return self.finish(self.start(prompt_ids, num_generations, step))

    def close(self):
        pass


class Recorder(TrainerCallback):
    """Keeps what each trained round was built from."""

    def __init__(self):
        self.prompts, self.old_logps = [], []

    def on_self_distillation_batch_prepared(self, args, state, control, **payload):
        self.prompts.append(payload["prompt_ids"].tolist())
        self.old_logps.append(payload["old_per_token_logps"])


@pytest.fixture
def run(monkeypatch, tiny_config, tiny_model_dir, tokenizer):
    """`run(output_dir, server=None, resume=None, **config)`: 6 steps on 4 toy rows (2 rounds an epoch) against `server`
    (a `FakeServer` by default); returns the trainer, the server and a `Recorder`."""

    def train(output_dir, server=None, resume=None, **overrides):
        server = server or FakeServer()
        monkeypatch.setattr(SDFTTrainer, "_build_rollout", lambda self: server)
        recorder = Recorder()
        args = tiny_config(output_dir, **{"max_steps": 6, "use_vllm": True, "vllm_mode": "server", **overrides})
        dataset = Dataset.from_list(facts_rows(4))
        trainer = SDFTTrainer(tiny_model_dir, args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer.add_callback(recorder)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, server, recorder

    return train


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


@pytest.mark.parametrize(
    "layout", [dict(per_device_train_batch_size=4), dict(per_device_train_batch_size=2, gradient_accumulation_steps=2)]
)
def test_rounds_are_sent_one_step_ahead_in_the_loop_order(run, tmp_path, layout):
    """Across 3 epochs (2 rounds each), the async run trains on the same rounds, in the same order, as the synchronous
    one; every round after the first was sent with the previous step's weights, one round at a time, and none is sent
    past the last step."""
    sync, _, sync_rounds = run(tmp_path / "sync", **layout)
    trainer, server, rounds = run(tmp_path / "async", async_rollouts=True, **layout)
    assert len(rounds.prompts) == 6
    assert rounds.prompts == sync_rounds.prompts
    assert [step for step, _ in server.sent] == [0, 0, 1, 2, 3, 4]
    assert server.most_in_flight == 1
    assert logged(trainer, "async/staleness") == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert logged(trainer, "async/regenerated") == [0.0] * 6
    assert logged(sync, "async/staleness") == []


def test_staleness_zero_trains_like_the_synchronous_trainer(run, tmp_path):
    sync, _, _ = run(tmp_path / "sync")
    trainer, server, rounds = run(tmp_path / "zero", async_rollouts=True, max_staleness=0)
    assert [step for step, _ in server.sent] == [0, 1, 2, 3, 4, 5]  # each round generated when it is trained
    assert logged(trainer, "loss") == pytest.approx(logged(sync, "loss"), rel=1e-6, abs=1e-8)
    assert all(old is None for old in rounds.old_logps)


def test_stale_rounds_are_weighted_by_the_servers_log_probs(run, tmp_path):
    """The rollout policy of an async round is the server's: its log-probs become the old log-probs, and the ratio of
    the current student to them (capped at distillation_is_clip) weights the loss."""
    # Without the engine-mismatch correction the synchronous run weights nothing; the async run still weights by
    # student / server (with it on, both runs weight by that same ratio).
    off = dict(max_steps=3, vllm_importance_sampling_correction=False)
    sync, _, _ = run(tmp_path / "sync", **off)
    trainer, _, rounds = run(tmp_path / "async", async_rollouts=True, **off)
    for old in rounds.old_logps:
        assert old is not None and set(old.unique().tolist()) <= {SERVER_LOGP, 0.0}  # 0.0: padding
    ratios = logged(trainer, "self_distillation/importance_ratio")
    assert len(ratios) == 3 and all(r > 0 for r in ratios)
    assert logged(trainer, "self_distillation/importance_clipped_fraction")
    assert logged(trainer, "loss") != pytest.approx(logged(sync, "loss"), rel=1e-4)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_resume_continues_the_same_rounds(run, tmp_path, asynchronous):
    """Resumed at an epoch boundary, a run trains on the rounds the uninterrupted run trained on, with the same losses
    (the sampler's order depends on the epoch only: `EpochRepeatSampler`). Async: nothing is in flight after a resume,
    the first round is generated with the restored weights."""
    settings = dict(async_rollouts=asynchronous)
    whole, _, whole_rounds = run(tmp_path, save_strategy="steps", save_steps=2, **settings)
    checkpoint = tmp_path / "checkpoint-4"
    assert checkpoint.is_dir()
    resumed, server, rounds = run(tmp_path, resume=str(checkpoint), **settings)
    assert [step for step, _ in server.sent] == ([4, 4] if asynchronous else [4, 5])
    assert rounds.prompts == whole_rounds.prompts[4:]
    assert logged(resumed, "loss")[-2:] == pytest.approx(logged(whole, "loss")[-2:], rel=1e-5)


def test_epoch_sampler_orders_depend_on_the_epoch_only():
    """Pass e of a fresh `EpochRepeatSampler` set to epoch e reads what pass e of one sampler read, which is what TRL's
    `RepeatSampler` reads (same orders as before, now reproducible after a resume)."""
    from trl.trainer.utils import RepeatSampler

    from trl_sdft.data import EpochRepeatSampler

    kwargs = dict(data_source=list(range(10)), mini_repeat_count=2, batch_size=5, seed=3)
    trl_sampler, ours = RepeatSampler(**kwargs), EpochRepeatSampler(**kwargs)
    passes = [list(trl_sampler) for _ in range(4)]
    for epoch in range(4):
        ours.set_epoch(epoch)
        assert list(ours) == passes[epoch]
    fresh = EpochRepeatSampler(**kwargs)
    fresh.set_epoch(3)
    assert list(fresh) == passes[3] != passes[2]


def test_a_server_failing_mid_run_stops_training_with_checkpoints_intact(run, tmp_path):
    with pytest.raises(VLLMServerError, match="failed while generating"):
        run(
            tmp_path,
            server=FakeServer(fail_at=4),
            async_rollouts=True,
            save_strategy="steps",
            save_steps=1,
        )
    assert (tmp_path / "checkpoint-2" / "model.safetensors").is_file()


def test_lookahead_reads_the_next_epoch_the_loop_would_read():
    """The loop's batches are those of the plain loader, epoch after epoch, though the lookahead read them first (the
    loader draws its order at the first read of an epoch, as a DataLoader with a seeded sampler does)."""
    import random

    class Loader:
        def __init__(self):
            self.rng = random.Random(0)

        def __iter__(self):  # a generator: nothing is drawn before the first read
            order = list(range(4))
            self.rng.shuffle(order)
            yield from ([i] for i in order)

    plain = Loader()
    expected = [item for _ in range(3) for item in iter(plain)]
    loader = Loader()
    lookahead = RoundLookahead(loader)
    seen, position = [], 0
    for _ in range(3):
        reader = lookahead.loop_iterator(iter(loader))  # the loop makes its own iterator each epoch
        while True:
            upcoming = lookahead.item(position + 2)
            try:
                item = next(reader)
            except StopIteration:
                break
            seen.append(item)
            if position + 2 < len(expected):
                assert upcoming == expected[position + 2]
            lookahead.forget(position)
            position += 1
    assert seen == expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(use_vllm=False), "vllm_mode='server'"),
        (dict(vllm_mode="colocate"), "vllm_mode='server'"),
        (dict(max_staleness=-1), "max_staleness=-1"),
        (dict(steps_per_generation=4, per_device_train_batch_size=2), "max_staleness>=4"),
        (dict(distillation_is_clip=None), "distillation_is_clip"),
        (dict(use_teacher_server=True, teacher_model_kind="live"), "use_teacher_server"),
    ],
)
def test_bad_async_settings_are_refused_with_the_fix(tmp_path, overrides, message):
    settings = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        per_device_train_batch_size=4,
        num_generations=2,
        async_rollouts=True,
        use_vllm=True,
        vllm_mode="server",
    )
    settings.update(overrides)
    with pytest.raises(ValueError, match=re.escape(message)):
        SDFTConfig(**settings)
    assert os.listdir(tmp_path) == []
