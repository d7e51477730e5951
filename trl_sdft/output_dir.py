"""The CLIs' output directory: never replace an earlier run's model or checkpoints unasked, never share one between
two runs at once.

`claim_output_dir` runs before any model is loaded. A directory that already holds a model or checkpoints is
refused unless the run resumes from one of them or `--overwrite_output_dir` is given (then the stale checkpoints are
removed, so that a later `--resume_from_checkpoint true` cannot pick one of the old run's). An advisory lock
(`fcntl.flock` on `.trl-sdft.lock`, released by the kernel when the process ends, however it ends) keeps a second
run out while the first one writes. The lock is the CLI's: the library never takes it.
"""

import errno
import logging
import os
import re
import shutil

from .checkpoints import checkpoint_dirs

LOCK_FILE = ".trl-sdft.lock"
logger = logging.getLogger(__name__)
# A directory holding any of these holds a finished model (or adapter) that saving would replace.
MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "adapter_config.json",
    "adapter_model.safetensors",
)
# What an earlier training run leaves behind: its final model (full or adapter) and its trainer state.
RESULT_FILES = (*MODEL_FILES, "trainer_state.json")


def earlier_results(path: str) -> list[str]:
    """Names in `path` that an earlier training run wrote (a model, its checkpoints)."""
    if not os.path.isdir(path):
        return []
    names = [name for name in RESULT_FILES if os.path.exists(os.path.join(path, name))]
    return names + [os.path.basename(p) for p in reversed(checkpoint_dirs(path))]


def _is_model_file(name: str) -> bool:
    """The files of a saved model or adapter (weights, shards, their index, configs)."""
    if name in RESULT_FILES or name in ("adapter_model.bin", "generation_config.json"):
        return True
    return (
        re.fullmatch(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)|.*\.safetensors\.index\.json", name)
        is not None
    )


class OutputDirLock:
    """An exclusive advisory lock on an output directory, held while this object lives (or until `release`)."""

    def __init__(self, path: str, flag: str = "--output_dir"):
        import fcntl

        self.path = os.path.join(path, LOCK_FILE)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # A filesystem without flock (some network and FUSE mounts): run unlocked rather than never.
                logger.warning(f"{flag} {path!r}: no lock on this filesystem ({err.strerror}); run unlocked.")
                return
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip()  # empty if it has not written yet
            os.close(self._fd)
            self._fd = None
            raise ValueError(
                f"{flag} {path!r} is in use by another run{f' (pid {holder})' if holder else ''}: two runs in one directory would overwrite "
                f"each other's checkpoints and model. Wait for it to finish, or choose another {flag}."
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __del__(self):
        self.release()


RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")  # torchrun/accelerate, Open MPI, MPICH/Intel MPI


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate / MPI launch, or a single process (read from the launcher's environment:
    the CLI claims its directory before torch.distributed starts)."""
    rank = next((os.environ[name] for name in RANK_VARIABLES if name in os.environ), "0")
    return rank.strip() == "0"


def claim_output_dir(
    path: str, overwrite: bool = False, resuming: bool = False, flag: str = "--output_dir", log=print
) -> OutputDirLock | None:
    """Make sure `path` may be written by this run, create it, and lock it (main process only; returns the lock, to
    be kept for the run). Raises a `ValueError` that says what is there and how to go on."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a file, not a directory: choose a directory path.")
    if not is_main_process():
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"{flag} {path!r} cannot be created ({err.strerror or err}): choose a writable path."
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path!r} is not writable by this user: choose a writable path.")
    lock = OutputDirLock(path, flag)
    found = earlier_results(path)
    if found and not resuming:
        if not overwrite:
            lock.release()
            shown = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
            raise ValueError(
                f"{flag} {path!r} already holds an earlier run's results ({shown}). Resume it with "
                "`--resume_from_checkpoint true`, replace it with `--overwrite_output_dir`, or choose another "
                f"{flag}."
            )
        stale = checkpoint_dirs(path)
        for checkpoint in stale:
            shutil.rmtree(checkpoint)
        weights = [name for name in os.listdir(path) if _is_model_file(name)]
        for name in weights:  # a loader could pick an old file beside the new ones (an adapter, an unsharded copy)
            os.remove(os.path.join(path, name))
        if log:
            log(
                f"--overwrite_output_dir: replacing the earlier run in {path}: removed {len(stale)} checkpoint(s) and "
                f"{len(weights)} model file(s)"
            )
    return lock
