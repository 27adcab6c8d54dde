"""Multi-task HTTP serving: one frozen model in memory, many tasks (one small prompt file each), mixed-task batches.

    softprompt serve --prompts DIR [--model NAME|PATH] [--host 127.0.0.1 --port 8000]

Layers (each usable on its own): registry (tasks, prompt/KV cache, admin changes), batching (pure collate/unbatch
and mixed-task scoring), generation (iteration-level decoding), scheduler (queue, batches, model thread), app
(FastAPI endpoints), server (settings and uvicorn). See docs/serving.md.
"""

from softprompt.serve.app import create_app
from softprompt.serve.pipeline import Item, collate, unbatch
from softprompt.serve.generation import GenParams
from softprompt.serve.registry import Registry, TaskEntry, validate_name
from softprompt.serve.scheduler import Scheduler
from softprompt.serve.server import ServeConfig, build, serve

__all__ = [
    "GenParams",
    "Item",
    "Registry",
    "Scheduler",
    "ServeConfig",
    "TaskEntry",
    "build",
    "collate",
    "create_app",
    "serve",
    "unbatch",
    "validate_name",
]
