"""What the CLIs do to the processes they own, and the library never does: start the processes an `accelerate launch
--cpu` asked for, and tear torch.distributed down at the end without the gloo hang (keeping process groups alive past
exit and arming a faulthandler backstop, both process-wide)."""

import os
import sys

PROCESSES_VARIABLE = "TRL_SDFT_CPU_PROCESSES"


def _parent_command_line() -> list[str]:
    """The command line of the process that started us (Linux `/proc`; empty where it cannot be read)."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0") if part]
    except OSError:
        return []


def _option(arguments: list[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` in `arguments`, or None."""
    for index, part in enumerate(arguments):
        if part.startswith(f"{name}="):
            return part.split("=", 1)[1]
        if part == name and index + 1 < len(arguments):
            return arguments[index + 1]
    return None


def _processes_from_parent_command_line() -> int | None:
    """`--num_processes` of the `accelerate launch` that started us, read from its command line (Linux `/proc`).
    accelerate's CPU launcher passes the number to no environment variable, so this is the one place it is found
    when the user did not set `TRL_SDFT_CPU_PROCESSES`."""
    value = _option(_parent_command_line(), "--num_processes")
    return int(value) if value is not None and value.isdigit() else None


def dropped_engine(env=None, parent: list[str] | None = None) -> str | None:
    """One line when `accelerate launch --cpu` was asked for DeepSpeed or FSDP (in its config file or by flag): the
    flag starts plain processes, which would each train a whole, unsharded copy of the model without a word."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1"):
        return None
    if any(env.get(name, "").lower() in ("true", "1") for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP")):
        return None  # the engine came through
    parent = _parent_command_line() if parent is None else parent
    if not any(part.endswith("accelerate") or "accelerate.commands" in part for part in parent[:3]):
        return None
    asked = [flag for flag in ("--use_deepspeed", "--use_fsdp") if flag in parent]
    path = _option(parent, "--config_file")
    if path is None:
        from accelerate.commands.config.config_args import default_config_file as path
    engine = None
    try:
        import yaml

        with open(path) as f:
            engine = (yaml.safe_load(f) or {}).get("distributed_type")
    except (OSError, ValueError, AttributeError, ImportError):
        pass
    if engine in ("DEEPSPEED", "FSDP"):
        asked.append(f"{engine} in {path}")
    if not asked:
        return None
    return (
        f"trl-sdft: warning: `accelerate launch --cpu` drops what was asked for ({', '.join(asked)}): its processes "
        "train whole, unsharded copies of the model. To shard on CPUs, launch without --cpu and with `use_cpu: false` "
        "in the accelerate config (docs/guides/distributed.md)."
    )


def requested_cpu_processes(env=None) -> int | None:
    """How many CPU processes the user asked for: `TRL_SDFT_CPU_PROCESSES` when set, else the parent
    `accelerate launch --num_processes` (see `_processes_from_parent_command_line`)."""
    env = os.environ if env is None else env
    given = env.get(PROCESSES_VARIABLE, "").strip()
    if given:
        if not given.isdigit() or int(given) < 1:
            raise ValueError(f"{PROCESSES_VARIABLE}={given!r}: must be a whole number of processes >= 1.")
        return int(given)
    return _processes_from_parent_command_line()


def relaunch_cpu_processes(argv) -> int | None:
    """`accelerate launch --cpu --num_processes N` starts one process unless MPI is set up; start N with torchrun.

    Only when accelerate's simple launcher asked for several CPU processes (it sets MASTER_ADDR but no RANK).
    The N processes then train with gloo, as under `accelerate launch --multi_gpu` on GPUs. `torchrun
    --nproc_per_node N` (which sets RANK) needs none of this.
    """
    env = os.environ
    if env.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1") or "RANK" in env or "MASTER_ADDR" not in env:
        return None
    processes = requested_cpu_processes(env)
    if processes is None:
        print(
            "trl-sdft: accelerate set up a multi-process CPU launch but started one process, and the number asked "
            f"for is unknown here: training in one process. Set {PROCESSES_VARIABLE}=N, or launch with `torchrun "
            "--nproc_per_node N`.",
            file=sys.stderr,
            flush=True,
        )
        return None
    if processes < 2:
        return None
    import subprocess

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        f"--master_addr={env['MASTER_ADDR']}",
        f"--master_port={env.get('MASTER_PORT', '29500')}",
        "-m",
        "trl_sdft.cli",
        *argv,
    ]
    print(f"trl-sdft: starting {processes} CPU processes (gloo) with torchrun", file=sys.stderr, flush=True)
    return subprocess.call(command)


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
