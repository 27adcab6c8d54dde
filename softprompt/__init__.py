"""softprompt: prompt tuning on frozen Hugging Face Transformers models.

The public names load lazily (PEP 562): `import softprompt` and the CLI's `--help` do not import torch or
transformers (seconds); the first use of, say, `softprompt.train` does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names for type checkers (`as X`: an explicit re-export); at run time __getattr__ loads them
    from softprompt.api import Predictor as Predictor
    from softprompt.api import info as info
    from softprompt.checkpoint import load_prompt as load_prompt
    from softprompt.checkpoint import save_prompt as save_prompt
    from softprompt.config import DataConfig as DataConfig
    from softprompt.config import ModelConfig as ModelConfig
    from softprompt.config import PromptConfig as PromptConfig
    from softprompt.config import RunConfig as RunConfig
    from softprompt.config import TrainConfig as TrainConfig
    from softprompt.icl import icl_evaluate as icl_evaluate
    from softprompt.models import load_backbone as load_backbone
    from softprompt.prompt import SoftPrompt as SoftPrompt
    from softprompt.prompt import init_prompt as init_prompt
    from softprompt.prompted import PromptedModel as PromptedModel
    from softprompt.train import train as train
    from softprompt.vision.api import ImagePredictor as ImagePredictor

__version__ = "0.1.0"
_EXPORTS = {
    "DataConfig": "config",
    "ImagePredictor": "vision.api",
    "ModelConfig": "config",
    "PromptConfig": "config",
    "Predictor": "api",
    "PromptedModel": "prompted",
    "RunConfig": "config",
    "SoftPrompt": "prompt",
    "TrainConfig": "config",
    "icl_evaluate": "icl",
    "info": "api",
    "init_prompt": "prompt",
    "load_backbone": "models",
    "load_prompt": "checkpoint",
    "save_prompt": "checkpoint",
    "train": "train",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'softprompt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"softprompt.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
