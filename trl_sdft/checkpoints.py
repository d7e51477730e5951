"""Checkpoints a run may resume from: complete ones only, checked before any model is loaded.

A checkpoint directory is complete once `trainer_state.json` is written and parses: the trainer writes the teacher
state first and `trainer_state.json` last, and rotates older checkpoints away only after that (`SDFTTrainer.
_save_checkpoint`). The checks here are cheap: they read the trainer state and the headers of the weight files
(a cut-short safetensors file fails its header check; a cut-short torch zip file has no central directory), not the
weights themselves.
"""

import json
import logging
import os
import re
import zipfile

TRAINER_STATE_NAME = "trainer_state.json"
TEACHER_STATE_FILE = "sdft_teacher.safetensors"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_ZERO_RANK = re.compile(r"zero_pp_rank_(\d+)_")

logger = logging.getLogger(__name__)


def checkpoint_number(path: str) -> int:
    """N of a `checkpoint-N` directory."""
    return int(_CHECKPOINT.match(os.path.basename(os.path.normpath(path))).group(1))


def checkpoint_dirs(output_dir: str) -> list[str]:
    """The `checkpoint-N` directories of `output_dir`, newest (highest N) first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found, reverse=True)]


def weight_file_problem(path: str) -> str | None:
    name = os.path.basename(path)
    if name.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, "pt"):
                pass
        except Exception as err:  # SafetensorError: truncated, or not a safetensors file
            return f"{name} is truncated or corrupt ({str(err).splitlines()[0]})"
    elif name.endswith((".pt", ".pth", ".bin")):
        if os.path.getsize(path) == 0:
            return f"{name} is empty (a save cut short)"
        with open(path, "rb") as f:
            legacy = f.read(1) == b"\x80"  # torch's pre-1.6 format is a plain pickle: no cheap check, accepted
        if not legacy and not zipfile.is_zipfile(path):
            return f"{name} is truncated or corrupt (not a complete torch file)"
    return None


def _ranks_complete(names: list[str]) -> bool:
    ranks = sorted(int(match.group(1)) for name in names if (match := _ZERO_RANK.search(name)))
    return ranks == list(range(len(ranks)))


def engine_state_problem(path: str) -> str | None:
    """What is missing from the sharded state a checkpoint holds, or None: DeepSpeed's (`latest` names a
    `global_stepN/` directory with one model-state and one optimizer-state file per process) and FSDP's sharded state
    dicts (`pytorch_model_fsdp_*/`, `optimizer_*/`: torch.distributed.checkpoint writes `.metadata` after every shard)."""
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest, errors="replace") as f:
            tag = f.read().strip()
        state_dir = os.path.join(path, tag)
        if not tag or os.sep in tag or not os.path.isdir(state_dir):
            return f"names DeepSpeed state {tag!r} in `latest`, which it does not hold (a save cut short)"
        names = os.listdir(state_dir)
        models = [name for name in names if name.endswith("_model_states.pt")]
        optimizers = [name for name in names if name.endswith("_optim_states.pt")]
        # ZeRO-3 writes model states per process (`zero_pp_rank_R_...`), ZeRO-1/2 one file; optimizer states are per
        # process under every stage (`[bf16_]zero_pp_rank_R_...`): their ranks must run 0, 1, ... without a gap.
        gaps = [kind for kind, files in (("model", models), ("optimizer", optimizers)) if not _ranks_complete(files)]
        if not models or gaps:
            found = f"{len(models)} model-state and {len(optimizers)} optimizer-state files"
            return f"holds incomplete DeepSpeed state in {tag}/ ({found}: a save cut short)"
        for name in sorted(models + optimizers):
            problem = weight_file_problem(os.path.join(state_dir, name))
            if problem:
                return f"holds DeepSpeed state {tag}/{problem}"
    for name in sorted(os.listdir(path)):
        sharded = os.path.join(path, name)
        if name.startswith(("pytorch_model_fsdp_", "optimizer_")) and os.path.isdir(sharded):
            if not os.path.isfile(os.path.join(sharded, ".metadata")):
                return f"holds FSDP sharded state {name}/ without its .metadata (a save cut short)"
    return None


def checkpoint_problem(path: str, needs_teacher_state: bool = False) -> str | None:
    """Why `path` is not a complete checkpoint to resume from, or None when it is one."""
    if not os.path.exists(path):
        return "does not exist"
    if not os.path.isdir(path):
        return "is not a directory"
    state_path = os.path.join(path, TRAINER_STATE_NAME)
    if not os.path.isfile(state_path):
        return f"has no {TRAINER_STATE_NAME}: its save was cut short, or it is not a Trainer checkpoint"
    try:
        with open(state_path) as f:
            state = json.load(f)
        int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"has a truncated or invalid {TRAINER_STATE_NAME} ({type(err).__name__}: {err})"
    for name in sorted(os.listdir(path)):
        problem = weight_file_problem(os.path.join(path, name))
        if problem:
            return problem
    problem = engine_state_problem(path)
    if problem:
        return problem
    if needs_teacher_state and not os.path.isfile(os.path.join(path, TEACHER_STATE_FILE)):
        return (
            f"holds no EMA teacher state ({TEACHER_STATE_FILE}): it was not written by trl-sdft with an EMA teacher, "
            "and resuming would silently reset the teacher to the current weights"
        )
    return None


def checkpoint_step(path: str) -> int:
    with open(os.path.join(path, TRAINER_STATE_NAME)) as f:
        return int(json.load(f)["global_step"])


def last_complete_checkpoint(output_dir: str, needs_teacher_state: bool = False) -> str | None:
    """The newest complete checkpoint in `output_dir`; incomplete newer ones are skipped with a warning."""
    for path in checkpoint_dirs(output_dir):
        problem = checkpoint_problem(path, needs_teacher_state)
        if problem is None:
            return path
        logger.warning(f"Skipping {path} to resume from: it {problem}.")
    return None


def resolve_resume_from_checkpoint(resume, output_dir: str, needs_teacher_state: bool = False) -> str | None:
    """The checkpoint directory to resume from (`resume`: None/False, True for the newest complete one in
    `output_dir`, or a path), or a `ValueError` that names the directory and what is wrong with it."""
    if isinstance(resume, str) and resume.strip().lower() in ("true", "false", ""):
        resume = resume.strip().lower() == "true"
    if resume is None or resume is False:
        return None
    if resume is True:
        path = last_complete_checkpoint(output_dir, needs_teacher_state)
        if path is None:
            found = checkpoint_dirs(output_dir)
            detail = f" ({len(found)} incomplete one(s) skipped, see the warnings)" if found else ""
            raise ValueError(
                f"--resume_from_checkpoint true: no complete checkpoint in {output_dir!r} to resume from{detail}. "
                "Check --output_dir, or start without --resume_from_checkpoint."
            )
        return path
    path = os.fspath(resume)
    problem = checkpoint_problem(path, needs_teacher_state)
    if problem:
        hint = "pass another checkpoint directory, or `true` for the newest complete one in --output_dir"
        raise ValueError(f"--resume_from_checkpoint {path!r} {problem}; {hint}.")
    return path


# What makes two models' weights incompatible: a checkpoint whose config differs in one of these is another model's.
SHAPE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
)


def model_mismatch(path: str, config: dict | None) -> str | None:
    """How checkpoint `path` (its `config.json`) differs from the model `config` in shape, or None (also when either
    says nothing: an adapter-only checkpoint has no config.json)."""
    config_path = os.path.join(path, "config.json")
    if not config or not os.path.isfile(config_path):
        return None
    try:
        with open(config_path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None  # the weights' own check reports a damaged checkpoint
    if not isinstance(saved, dict):
        return None
    nested = [isinstance(side.get("text_config"), dict) and "hidden_size" not in side for side in (saved, config)]
    saved, config = (side["text_config"] if inner else side for side, inner in zip((saved, config), nested))
    # One side written nested (a vision-language config), the other flat: their model types name different things.
    keys = SHAPE_KEYS if nested[0] == nested[1] else SHAPE_KEYS[1:]
    differ = [key for key in keys if key in saved and key in config and saved[key] != config[key]]
    if not differ:
        return None
    shown = ", ".join(f"{key} {saved[key]!r} there, {config[key]!r} here" for key in differ[:3])
    return f"was saved from another model ({shown})"


def prepare_resume(resume, output_dir: str, teacher, warn, model_config: dict | None = None) -> str | None:
    """The checkpoint to resume from (see `resolve_resume_from_checkpoint`), with the teacher's state loaded into
    `teacher`; `warn` is told when an EMA teacher's state is dropped (the run's teacher keeps none) and when later
    checkpoints of an earlier run remain beyond the one resumed. A checkpoint of a model other than `model_config`'s
    is refused as such."""
    needs_teacher_state = teacher.state_dict() is not None
    path = resolve_resume_from_checkpoint(resume, output_dir, needs_teacher_state)
    if path is None:
        return None
    mismatch = model_mismatch(path, model_config)
    if mismatch:
        raise ValueError(
            f"--resume_from_checkpoint {path!r} {mismatch}: resume with the model it was trained from, or start "
            "without --resume_from_checkpoint."
        )
    if os.path.isfile(os.path.join(path, TEACHER_STATE_FILE)) and not needs_teacher_state:
        warn(
            f"{path} holds an EMA teacher's state, but this run's teacher is `teacher_model_kind={teacher.kind!r}`: "
            "the EMA teacher is dropped. Resume with `teacher_model_kind='ema'` to keep it."
        )
    teacher.load(path)
    step = checkpoint_step(path)
    later = [other for other in checkpoint_dirs(output_dir) if checkpoint_number(other) > step]
    if later:
        warn(
            f"Resuming from step {step} while {len(later)} later checkpoint(s) of an earlier run remain in "
            f"{output_dir} ({os.path.basename(later[0])}, ...): this run overwrites them as it reaches their steps, "
            "and until then `resume_from_checkpoint=True` would pick them. Move them aside to keep them."
        )
    return path
