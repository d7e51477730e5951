"""`rollouts/`: the transformers backend and its helpers (end tokens, sampling config), the backend registry, the
protocols, and the environment around the colocated vLLM engine's construction (no vLLM needed here)."""

import os

import pytest
import torch

from trl_sdft import rollouts
from trl_sdft.batch import tokenize_prompts
from trl_sdft.rollouts import (
    ROLLOUT_BACKENDS,
    BackgroundRollouts,
    RolloutBackend,
    RolloutContext,
    Rollouts,
    RolloutSettings,
    TeacherScorer,
    VLLMSettings,
    build_rollout,
    cut_at_eos,
    eos_token_ids,
    register_rollout_backend,
    sampling_config,
)
from trl_sdft.rollouts.transformers import TransformersRollout
from trl_sdft.settings import rollout_settings


def test_cut_at_eos_keeps_the_first_end_token():
    assert cut_at_eos([[1, 2, 9, 3, 9], [4, 5], [8, 1]], [9, 8]) == [[1, 2, 9], [4, 5], [8]]
    assert cut_at_eos(torch.tensor([[1, 9, 2]]).tolist(), [9]) == [[1, 9]]


def test_eos_ids_join_the_model_and_the_tokenizer(tiny_model, tokenizer):
    tiny_model.generation_config.eos_token_id = [tokenizer.eos_token_id, 7]
    assert eos_token_ids(tiny_model, tokenizer) == [tokenizer.eos_token_id, 7]
    tiny_model.generation_config.eos_token_id = 7
    assert eos_token_ids(tiny_model, tokenizer) == [tokenizer.eos_token_id, 7]


def test_sampling_config_takes_generation_kwargs_last(tmp_path, tiny_config, tokenizer):
    args = tiny_config(tmp_path, temperature=0.7, top_k=5, generation_kwargs={"top_k": 3, "min_new_tokens": 2})
    config = sampling_config(rollout_settings(args), tokenizer, [tokenizer.eos_token_id])
    assert config.do_sample and config.temperature == 0.7 and config.top_k == 3 and config.min_new_tokens == 2
    assert config.max_new_tokens == args.max_completion_length


@pytest.mark.parametrize("forced", [3, 6])
def test_transformers_rollout_samples_until_the_limit_or_the_end(tmp_path, tiny_config, tiny_model, tokenizer, forced):
    from accelerate import Accelerator

    args = tiny_config(tmp_path, max_completion_length=6, generation_kwargs={"min_new_tokens": forced})
    eos = [tokenizer.eos_token_id]
    rollout = TransformersRollout(
        Accelerator(cpu=True), sampling_config(rollout_settings(args), tokenizer, eos), eos, tokenizer.pad_token_id
    )
    prompts = tokenize_prompts(tokenizer, ["What color is Zorbo?", "What color is Quilla? It is"])
    rollouts = rollout.generate(tiny_model, prompts, num_generations=1, step=0)
    completions, logprobs = rollouts.completions, rollouts.logprobs
    assert len(completions) == 2 and logprobs is None  # transformers reports no log-probs of its own
    for completion in completions:
        assert forced <= len(completion) <= 6
        assert eos[0] not in completion[:-1]  # nothing after an end token


# ---------------------------------------------------------------------------------------------------- registry
@pytest.fixture
def registry():
    """`ROLLOUT_BACKENDS` as it was before the test, whatever the test registers."""
    saved = dict(ROLLOUT_BACKENDS)
    yield ROLLOUT_BACKENDS
    ROLLOUT_BACKENDS.clear()
    ROLLOUT_BACKENDS.update(saved)


def context(settings, accelerator=None, tokenizer=None, model=None, longest=(0, 0)) -> RolloutContext:
    return RolloutContext(model, accelerator, tokenizer, tokenizer, settings, [2], *longest)


class ToyBackend:
    """Echoes each prompt's last token; records the context it was built from."""

    def __init__(self, context):
        self.context = context

    def generate(self, model, prompt_ids, num_generations, step):
        return Rollouts([[prompt[-1]] for prompt in prompt_ids])

    def close(self):
        pass

    def describe(self):
        return "toy"


def test_unknown_backend_names_the_registered_ones(registry):
    register_rollout_backend("toy", ToyBackend)
    with pytest.raises(ValueError) as error:
        build_rollout(context(RolloutSettings(backend="nope")))
    message = str(error.value)
    assert "'nope'" in message and "'transformers', 'vllm', 'toy'" in message
    assert "register_rollout_backend" in message
    assert rollouts.rollout_backends() == ("transformers", "vllm", "toy")


def test_duplicate_registration_is_refused_unless_replaced(registry):
    register_rollout_backend("toy", ToyBackend)
    with pytest.raises(ValueError, match="'toy' is already registered.*replace=True"):
        register_rollout_backend("toy", lambda context: None)
    with pytest.raises(ValueError, match="'transformers' is already registered"):
        register_rollout_backend("transformers", ToyBackend)
    assert registry["toy"] is ToyBackend and registry["transformers"] is not ToyBackend

    class Other(ToyBackend):
        pass

    register_rollout_backend("toy", Other, replace=True)
    built = build_rollout(context(RolloutSettings(backend="toy", temperature=0.5)))
    assert type(built) is Other and built.context.settings.temperature == 0.5
    assert built.generate(None, [[5, 6], [7]], 1, 0) == Rollouts([[6], [7]])


def test_transformers_backend_is_built_from_the_settings(tokenizer):
    from accelerate import Accelerator

    settings = RolloutSettings(max_completion_length=5, temperature=0.5, gather_deepspeed3_params=False)
    backend = build_rollout(context(settings, Accelerator(cpu=True), tokenizer))
    assert type(backend) is TransformersRollout and backend.describe() is None
    assert backend.generation_config.max_new_tokens == 5 and backend.generation_config.temperature == 0.5
    assert backend.generation_config.eos_token_id == [2] and backend.eos_token_ids == [2]
    assert backend.pad_token_id == tokenizer.pad_token_id and backend.gather_deepspeed3_params is False


def test_vllm_backend_needs_vllm_settings():
    with pytest.raises(ValueError, match=r"needs `RolloutSettings.vllm`.*use_vllm=True"):
        build_rollout(context(RolloutSettings(backend="vllm")))


def test_settings_defaults_are_the_config_defaults(tmp_path):
    """A bare `RolloutSettings` / `VLLMSettings` samples as a default config does."""
    from trl_sdft import SDFTConfig

    args = SDFTConfig(str(tmp_path), use_vllm=True, use_cpu=True, bf16=False, report_to="none")
    assert rollout_settings(args) == RolloutSettings(backend="vllm", engine_logprobs=True, vllm=VLLMSettings())


# ---------------------------------------------------------------------------------------------------- protocols
def test_backends_satisfy_the_protocols(tokenizer):
    from accelerate import Accelerator

    from trl_sdft.rollouts.vllm import VLLMRollout

    transformers_backend = build_rollout(context(RolloutSettings(), Accelerator(cpu=True), tokenizer))
    assert isinstance(transformers_backend, RolloutBackend)
    assert not isinstance(transformers_backend, BackgroundRollouts | TeacherScorer)
    assert isinstance(ToyBackend(None), RolloutBackend)
    # The vLLM backend, checked on the class (no engine): rollouts, rounds in the background, teacher scores.
    for protocol in (RolloutBackend, BackgroundRollouts, TeacherScorer):
        assert issubclass(VLLMRollout, protocol)
    assert isinstance(object.__new__(VLLMRollout), BackgroundRollouts)

    class NoDescription:
        def generate(self, model, prompt_ids, num_generations, step):
            return Rollouts([])

        def close(self):
            pass

    assert not isinstance(NoDescription(), RolloutBackend)


# ---------------------------------------------------------------------------------------------- vLLM colocate
def test_engine_dtype_follows_the_settings(tiny_model):
    from trl_sdft.rollouts.vllm_engine import engine_dtype

    assert engine_dtype(VLLMSettings(dtype="float16", precision="bf16"), tiny_model) == "float16"
    assert engine_dtype(VLLMSettings(precision="bf16"), tiny_model) == torch.bfloat16
    assert engine_dtype(VLLMSettings(precision="fp16"), tiny_model) == torch.float16
    assert engine_dtype(VLLMSettings(), tiny_model) == tiny_model.dtype


class FakeAccelerator:
    num_processes, process_index, local_process_index = 1, 0, 0
    device = torch.device("cpu")


def colocated_generation(model_dir):
    """An `SDFTVLLMGeneration` in colocate mode with the attributes `_init_colocate` reads, and no engine."""
    from types import SimpleNamespace

    from trl_sdft.rollouts.vllm_engine import SDFTVLLMGeneration

    generation = object.__new__(SDFTVLLMGeneration)
    generation.accelerator = FakeAccelerator()
    generation.model = SimpleNamespace(name_or_path=str(model_dir))
    generation.tensor_parallel_size, generation.gpu_memory_utilization, generation.max_model_length = 1, 0.3, None
    generation.dtype, generation.enforce_eager, generation.max_num_seqs = None, None, 8
    generation.enable_sleep_mode, generation.model_impl, generation.trust_remote_code = False, "vllm", False
    return generation


LAUNCHER = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VLLM_ENABLE_V1_MULTIPROCESSING")


@pytest.mark.parametrize("preset", [{}, {"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29511", "RANK": "0"}])
@pytest.mark.parametrize("fails", [False, True])
def test_colocate_init_leaves_the_environment_as_it_was(tmp_path, monkeypatch, preset, fails):
    """The engine is built in a torchrun-like environment (what vLLM's "external_launcher" reads), and the process's
    environment is the same afterwards, also when vLLM changes one of those variables itself or fails to start."""
    for name in LAUNCHER:
        monkeypatch.delenv(name, raising=False)
    for name, value in preset.items():
        monkeypatch.setenv(name, value)
    before = dict(os.environ)
    seen = {}

    def create_llm(self, **kwargs):
        seen.update({name: os.environ.get(name) for name in LAUNCHER}, kwargs=kwargs)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # as vLLM's ParallelConfig does for external_launcher
        if fails:
            raise RuntimeError("engine failed")
        return "engine"

    from trl_sdft.rollouts.vllm_engine import SDFTVLLMGeneration

    monkeypatch.setattr(SDFTVLLMGeneration, "_create_llm", create_llm)
    generation = colocated_generation(tmp_path)
    if fails:
        with pytest.raises(RuntimeError, match="engine failed"):
            generation._init_colocate()
    else:
        generation._init_colocate()
        assert generation.llm == "engine" and generation.sync_method == "reload"
    assert dict(os.environ) == before
    # What the engine saw while it was built.
    assert (seen["RANK"], seen["LOCAL_RANK"], seen["WORLD_SIZE"]) == ("0", "0", "1")
    assert seen["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert seen["MASTER_ADDR"] == preset.get("MASTER_ADDR", "localhost")
    assert seen["MASTER_PORT"] == preset.get("MASTER_PORT", seen["MASTER_PORT"]) and int(seen["MASTER_PORT"]) > 0
    assert seen["kwargs"]["distributed_executor_backend"] == "external_launcher"
