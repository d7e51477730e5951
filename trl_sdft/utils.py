"""Small helpers every module needs once: unwrapping models, the tokenizer of a processor, a pad token, packages."""

from importlib.util import find_spec


def unwrap(model):
    """The model under DDP / accelerate / DeepSpeed wrappers (each keeps the wrapped model in `.module`)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def tokenizer_of(processing_class):
    """The tokenizer of a processor (multimodal models), or the tokenizer itself."""
    return getattr(processing_class, "tokenizer", processing_class)


def ensure_pad_token(tokenizer):
    """Give a tokenizer without a pad token its end-of-sequence token as pad token (padding is always masked)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def require_package(module: str, feature: str, install: str) -> None:
    """Raise an `ImportError` naming the feature that needs `module` and how to install it."""
    if find_spec(module) is None:
        raise ImportError(f"{feature} needs the `{module}` package: {install}.")


def has_accelerator() -> bool:
    """Whether torch sees an accelerator (CUDA, XPU, MPS, ...) to train on."""
    import torch

    return torch.accelerator.is_available()


def cpu_runs_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 autocast is faster than float32.

    Elsewhere torch emulates bf16 on a CPU, which works but is slower than float32."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def native_bf16(use_cpu: bool = False) -> bool:
    """Whether training here runs bf16 natively: on a GPU with bf16, or (no accelerator, or `use_cpu`) on a CPU that
    has AVX512-BF16 or AMX."""
    from transformers.utils import is_torch_bf16_gpu_available

    if not use_cpu and has_accelerator():
        return bool(is_torch_bf16_gpu_available())
    return cpu_runs_bf16()


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def reuse_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep large freed blocks for reuse in this process; returns whether it applied.

    By default glibc serves every allocation above at most 32 MiB with a fresh `mmap` and unmaps it when freed, so a
    training step on a CPU page-faults through each of its large tensors (logits, weight casts, gradients) again on
    every step. Raising the mmap and trim thresholds keeps those pages mapped and reused: the same effect as exporting
    `MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647`. Peak memory stays what the step needs; memory
    freed below the top of the heap is not handed back to the system until the process ends. No-op off glibc."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))
