"""softprompt: prompt tuning on frozen Hugging Face Transformers models.

The public names load lazily (PEP 562): `import softprompt` and the CLI's `--help` do not import torch or
transformers (seconds); the first use of, say, `softprompt.train` does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from softprompt.api import Predictor, info
    from softprompt.checkpoint import load_prompt, save_prompt
    from softprompt.config import DataConfig, ModelConfig, PromptConfig, RunConfig, TrainConfig
    from softprompt.models import load_backbone
    from softprompt.prompt import SoftPrompt, init_prompt
    from softprompt.prompted import PromptedModel
    from softprompt.train import train

__version__ = "0.1.0"
_EXPORTS = {
    "DataConfig": "config",
    "ModelConfig": "config",
    "PromptConfig": "config",
    "Predictor": "api",
    "PromptedModel": "prompted",
    "RunConfig": "config",
    "SoftPrompt": "prompt",
    "TrainConfig": "config",
    "info": "api",
    "init_prompt": "prompt",
    "load_backbone": "models",
    "load_prompt": "checkpoint",
    "save_prompt": "checkpoint",
    "train": "train",
}
__all__ = [  # = _EXPORTS's keys, spelled out for linters and `from softprompt import *`
    "DataConfig",
    "ModelConfig",
    "PromptConfig",
    "Predictor",
    "PromptedModel",
    "RunConfig",
    "SoftPrompt",
    "TrainConfig",
    "info",
    "init_prompt",
    "load_backbone",
    "load_prompt",
    "save_prompt",
    "train",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'softprompt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"softprompt.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
