"""softprompt: prompt tuning on frozen Hugging Face Transformers models."""

from softprompt.api import Predictor, info
from softprompt.checkpoint import load_prompt, save_prompt
from softprompt.config import DataConfig, ModelConfig, PromptConfig, RunConfig, TrainConfig
from softprompt.models import load_backbone
from softprompt.prompt import SoftPrompt, init_prompt
from softprompt.prompted import PromptedModel
from softprompt.train import train

__version__ = "0.1.0"
__all__ = [
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
