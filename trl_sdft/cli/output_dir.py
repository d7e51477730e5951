"""The CLIs' output directory: never replace an earlier run's model or checkpoints unasked, never share one between
two runs at once.

`claim_output_dir` runs before any model is loaded. A directory that already holds a model or checkpoints is
refused unless the run resumes from one of its own checkpoints or `--overwrite_output_dir` is given (then the stale
checkpoints are removed, so that a later `--resume_from_checkpoint true` cannot pick one of the old run's; a symlinked
checkpoint loses its link, never its target). Nothing the run reads (its model, data, templates, the checkpoint it
resumes from) may sit in what would be removed, and a file the run writes (`README.md`, `results.json`, tokenizer
files) that is already there and was not written by an earlier run is never replaced without the flag. An advisory lock
(`fcntl.flock` on `.trl-sdft.lock`, released by the kernel when the process ends, however it ends) keeps a second
run out while the first one writes. The lock is the CLI's: the library never takes it.
"""

import errno
import logging
import os
import re
import shutil
import sys

from ..checkpoints import checkpoint_dirs

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
# What a run writes beside its model: a file of these names that is there already is the user's until the flag.
WRITTEN_FILES = (
    "README.md",  # the model card
    "results.json",  # the knowledge evaluation
    "training_args.bin",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def foreign_files(path: str) -> list[str]:
    """Files in `path` that a run would write over (`WRITTEN_FILES`) while no earlier run's results are there: the
    user's own (a `README.md` in a directory made for the run, say)."""
    if not os.path.isdir(path) or earlier_results(path):
        return []
    found = [name for name in WRITTEN_FILES if os.path.lexists(os.path.join(path, name))]
    return [name for name in found if not (name == "results.json" and _our_results(os.path.join(path, name)))]


def _our_results(path: str) -> bool:
    """A `results.json` the knowledge evaluation wrote (it writes one when training begins, before any checkpoint):
    a run stopped early leaves it, and running again must not be refused for it."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "evaluations" in data


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

        self._fd = None
        self.path = os.path.join(path, LOCK_FILE)
        if os.path.islink(self.path):
            raise ValueError(
                f"{flag} {path!r}: its lock file {LOCK_FILE} is a symlink (to {os.readlink(self.path)!r}), which a run "
                "never follows: remove the link."
            )
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as err:
            kind = "a directory" if os.path.isdir(self.path) else "not a file this user can open for writing"
            raise ValueError(
                f"{flag} {path!r}: its lock file {LOCK_FILE} is {kind} ({err.strerror or err}): remove it (a run "
                "creates its own), or choose another directory."
            ) from None
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
        if getattr(self, "_fd", None) is not None:
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


def is_inside(path: str, directory: str) -> bool:
    """`path` is `directory` or below it, by its own name or after resolving symlinks."""
    for a, b in (
        (os.path.abspath(path), os.path.abspath(directory)),
        (os.path.realpath(path), os.path.realpath(directory)),
    ):
        if a == b or a.startswith(b.rstrip(os.sep) + os.sep):
            return True
    return False


def _check_inputs_kept(path: str, removed: list[str], inputs, flag: str) -> None:
    """Refuse before anything is removed when an input of the run (flag, path) lies in what `--overwrite_output_dir`
    would remove."""
    for input_flag, input_path in inputs:
        if not input_path or not os.path.lexists(input_path):
            continue
        for target in removed:
            if is_inside(input_path, target):
                raise ValueError(
                    f"{input_flag} {input_path!r} is inside {os.path.basename(target)!r} of {flag} {path!r}, which "
                    "--overwrite_output_dir would remove with the earlier run: copy it out of that directory first, "
                    f"or choose another {flag}."
                )


def _remove(target: str, path: str, flag: str) -> None:
    """Remove a stale checkpoint or model file: a symlink loses the link only (its target may be anything)."""
    if os.path.islink(target) or not os.path.isdir(target):
        os.unlink(target)
        return
    problems = []
    if sys.version_info >= (3, 12):
        shutil.rmtree(target, onexc=lambda function, name, err: problems.append((name, err)))
    else:
        shutil.rmtree(target, onerror=lambda function, name, info: problems.append((name, info[1])))
    if problems:
        name, err = problems[0]
        raise ValueError(
            f"--overwrite_output_dir: {name!r} in {flag} {path!r} cannot be removed "
            f"({getattr(err, 'strerror', None) or err}): fix its permissions, or choose another {flag}."
        )


def claim_output_dir(
    path: str,
    overwrite: bool = False,
    resuming: bool = False,
    flag: str = "--output_dir",
    log=print,
    inputs: tuple = (),
) -> OutputDirLock | None:
    """Make sure `path` may be written by this run, create it, and lock it (main process only; returns the lock, to
    be kept for the run). `resuming`: the run resumes from one of `path`'s own checkpoints; `inputs`: (flag, path) of
    what the run reads, which `--overwrite_output_dir` must not remove. Raises a `ValueError` that says what is there
    and how to go on."""
    if os.path.islink(path) and not os.path.exists(path):
        raise ValueError(
            f"{flag} {path!r} is a symlink to {os.readlink(path)!r}, which does not exist: create the target "
            "directory, or choose another path."
        )
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
    try:
        _check_earlier_run(path, overwrite, resuming, flag, log, inputs)
    except BaseException:
        lock.release()
        raise
    return lock


def _check_earlier_run(path: str, overwrite: bool, resuming: bool, flag: str, log, inputs) -> None:
    if resuming:
        return
    found = earlier_results(path)
    foreign = foreign_files(path)
    if (found or foreign) and not overwrite:
        if foreign:
            raise ValueError(
                f"{flag} {path!r} holds {', '.join(foreign)}, which this run would write over (not an earlier run's): "
                f"move it, pass --overwrite_output_dir to replace it, or choose another {flag}."
            )
        shown = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
        raise ValueError(
            f"{flag} {path!r} already holds an earlier run's results ({shown}). Resume it with "
            "`--resume_from_checkpoint true`, replace it with `--overwrite_output_dir`, or choose another "
            f"{flag}."
        )
    if not found:
        return
    stale = [os.path.join(path, name) for name in sorted(os.listdir(path)) if _is_stale_checkpoint(path, name)]
    weights = [os.path.join(path, name) for name in os.listdir(path) if _is_model_file(name)]
    _check_inputs_kept(path, stale + weights, inputs, flag)
    for target in (
        stale + weights
    ):  # a loader could pick an old file beside the new ones (an adapter, an unsharded copy)
        _remove(target, path, flag)
    if log:
        log(
            f"--overwrite_output_dir: replacing the earlier run in {path}: removed {len(stale)} checkpoint(s) and "
            f"{len(weights)} model file(s)"
        )


def _is_stale_checkpoint(path: str, name: str) -> bool:
    """A `checkpoint-N` entry: a directory, or a symlink (to a directory or dangling)."""
    full = os.path.join(path, name)
    return re.fullmatch(r"checkpoint-\d+", name) is not None and (os.path.isdir(full) or os.path.islink(full))
