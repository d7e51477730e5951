"""Budget grids for the continual harness: which (method, learning rate, steps, SDFT variant) points to run (pure).

A grid file is JSON lines or YAML holding a list of points; every point runs once per seed of the comparison:

    - {method: sft, learning_rate: 1.0e-5, steps: 5}
    - {method: sdft, variant: paper, learning_rate: 5.0e-5, steps: 30}
    - {method: sdft, variant: base, alpha: 0.5, learning_rate: 1.0e-4, steps: 30}

`steps` defaults to the comparison's `--steps`; `alpha` (SDFT's `distillation_alpha`) to 0, or the variant's. SDFT
variants are named sets of `SDFTConfig` settings on top of the harness's own (`VARIANTS`); `paper` is the original
recipe as `configs/paper.yaml` writes it (`PAPER_RECIPE`, kept equal to that file by the tests).
"""

from dataclasses import dataclass
from pathlib import Path

from ..jsonl import JSONLineError, json_lines
from ..text_files import read_text, yaml_error_line

# The original SDFT recipe in SDFTConfig fields (see configs/paper.yaml for where each comes from). Batch, lengths,
# steps and the learning rate are the grid's.
PAPER_RECIPE = {
    "distillation_mode": "full_logits",
    "distillation_alpha": 0.0,
    "num_loss_tokens_to_skip": 3,
    "teacher_model_kind": "ema",
    "teacher_update_rate": 0.01,
    "teacher_sync_steps": 1,
    "teacher_prompt_template": "demonstration",
    "num_generations": 1,
    "generate_from_teacher": False,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.1,
    "max_grad_norm": 1.0,
}

# SDFT variants: SDFTConfig settings over the harness's defaults (frozen base teacher, the task's own teacher
# template, forward KL on the full vocabulary, constant learning rate).
VARIANTS = {
    "base": {},
    "paper": PAPER_RECIPE,
    "ema": {"teacher_model_kind": "ema", "teacher_update_rate": 0.01, "teacher_sync_steps": 1},
    "from_teacher": {"generate_from_teacher": True},
    "demonstration": {"teacher_prompt_template": "demonstration"},
}
POINT_KEYS = ("method", "learning_rate", "steps", "variant", "alpha")


@dataclass(frozen=True)
class Point:
    """One budget of one method: a run per seed."""

    method: str
    learning_rate: float
    steps: int | None = None
    variant: str | None = None  # SDFT only; None = "base"
    alpha: float | None = None  # SDFT only

    def sdft_overrides(self) -> dict:
        """The SDFTConfig settings of this point's variant, with its alpha."""
        overrides = dict(VARIANTS[self.variant or "base"])
        if self.alpha is not None:
            overrides["distillation_alpha"] = self.alpha
        return overrides


class GridError(ValueError):
    """A grid file that cannot be used; the message names the file, the entry and the fix."""


def point_from_dict(entry, where: str) -> Point:
    """A validated point from one grid entry; `where` names it in errors."""
    if not isinstance(entry, dict):
        raise GridError(f"{where}: a point is a mapping like {{method: sft, learning_rate: 1e-5}}, got {entry!r}.")
    unknown = sorted(set(entry) - set(POINT_KEYS))
    if unknown:
        raise GridError(f"{where}: unknown key(s) {unknown}; a point takes {', '.join(POINT_KEYS)}.")
    method = entry.get("method")
    if method not in ("sft", "sdft"):
        raise GridError(f"{where}: `method` must be 'sft' or 'sdft', got {method!r}.")
    rate = entry.get("learning_rate")
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or rate <= 0:
        raise GridError(f"{where}: `learning_rate` must be a positive number, got {rate!r}.")
    steps = entry.get("steps")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise GridError(f"{where}: `steps` must be an integer >= 1 (or left out for --steps), got {steps!r}.")
    variant, alpha = entry.get("variant"), entry.get("alpha")
    if method == "sft" and (variant is not None or alpha is not None):
        raise GridError(f"{where}: `variant` and `alpha` are SDFT settings; drop them from this SFT point.")
    if variant is not None and variant not in VARIANTS:
        raise GridError(f"{where}: unknown SDFT variant {variant!r}: use one of {', '.join(VARIANTS)}.")
    if alpha is not None and (not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1):
        raise GridError(f"{where}: `alpha` must lie in [0, 1] (0 forward KL, 1 reverse KL), got {alpha!r}.")
    if method == "sdft" and alpha is None:
        alpha = VARIANTS[variant or "base"].get("distillation_alpha", 0.0)
    return Point(method, float(rate), steps, variant if method == "sdft" else None, alpha)


def load_grid(path: str) -> list[Point]:
    """The points of a grid file (YAML list, or JSON lines with one point per line)."""
    file = Path(path)
    if not file.is_file():
        raise GridError(f"Grid file {path!r} does not exist.")
    try:
        text = read_text(path, "Grid file")
    except ValueError as err:
        raise GridError(str(err)) from None
    if file.suffix in (".jsonl", ".json"):
        try:
            entries = [(f"{path}, line {number}", point) for number, point in json_lines(text.splitlines())]
        except JSONLineError as err:
            raise GridError(f"{path}, line {err.number}: not valid JSON ({err.msg}).") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise GridError(yaml_error_line(path, err, flag="")) from None
        if not isinstance(data, list):
            raise GridError(f"{path}: a grid is a YAML list of points, e.g. `- {{method: sft, learning_rate: 1e-5}}`.")
        entries = [(f"{path}, point {number}", entry) for number, entry in enumerate(data, start=1)]
    if not entries:
        raise GridError(f"{path}: the grid has no points.")
    points = [point_from_dict(entry, where) for where, entry in entries]
    seen = set()
    for (where, _), point in zip(entries, points):
        if point in seen:
            raise GridError(f"{where}: the same point appears twice; each point runs once per seed.")
        seen.add(point)
    return points
