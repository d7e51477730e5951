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


def close_process_group(exit_code: int = 0, timeout_s: float = 60.0) -> None:
    """Tear down torch.distributed at the end of a multi-process run, never hanging there. Call it last: everything
    the run writes must be written already.

    The hang this avoids (seen with py-spy in the DDP test job): the last reference to a gloo process group dies on a
    thread that holds the GIL (a DDP reducer freed with its trainer, or the group's own teardown), so
    `~ProcessGroupGloo` joins its worker threads under the GIL, while a worker is still freeing a finished collective
    whose tensors are Python objects and waits for the GIL: a deadlock. The same worker freeing a tensor while the
    interpreter shuts down aborts the process instead ("terminate called without an active exception", exit -6).
    So this frees the run's garbage while the group is still registered, lets the workers finish freeing with the GIL
    released, destroys the group and keeps the group objects alive to the end of the process: their destructor, which
    only joins threads, never runs.

    Two watchdogs remain for what is left (a store or a peer that stops answering): after `timeout_s` seconds a thread
    says so on stderr and ends the process with `exit_code` (what the run would have returned); if the GIL is held,
    `faulthandler` ends it 5 s later with exit code 1 and every thread's stack, instead of a silent hang."""
    import ctypes
    import faulthandler
    import gc
    import os
    import sys
    import threading
    import time

    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    finished = threading.Event()

    def watchdog():
        if not finished.wait(timeout_s):
            print(
                f"trl-sdft: torch.distributed teardown did not finish within {timeout_s:.0f} s (a known gloo hang); "
                f"exiting with code {exit_code}: the run's outputs were already written",
                file=sys.stderr,
                flush=True,
            )
            sys.stdout.flush()
            os._exit(exit_code)

    threading.Thread(target=watchdog, name="trl-sdft-teardown-watchdog", daemon=True).start()
    faulthandler.dump_traceback_later(timeout_s + 5, exit=True)  # needs no GIL
    try:
        gc.collect()  # a trainer in a reference cycle drops its DDP reducer now, not after the group is gone
        time.sleep(0.5)  # GIL released: gloo's workers finish freeing their last collectives
        c10d = torch.distributed.distributed_c10d
        groups = list(getattr(getattr(c10d, "_world", None), "pg_map", None) or [c10d.GroupMember.WORLD])
        for group in groups:
            if group is not None:
                ctypes.pythonapi.Py_IncRef(ctypes.py_object(group))  # never destructed, not even at exit
        torch.distributed.destroy_process_group()
    finally:
        finished.set()
        faulthandler.cancel_dump_traceback_later()
