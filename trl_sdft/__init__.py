"""trl-sdft: Self-Distillation Fine-Tuning for Hugging Face TRL.

from trl_sdft import SDFTConfig, SDFTTrainer   # instead of trl.experimental.sdft
"""

from .callbacks import SelfDistillationCallback
from .config import SDFTConfig
from .prompts import TEMPLATE_PRESETS, build_teacher_prompt
from .trainer import SDFTTrainer

__version__ = "0.1.0"
__all__ = ["SDFTConfig", "SDFTTrainer", "SelfDistillationCallback", "TEMPLATE_PRESETS", "build_teacher_prompt"]
