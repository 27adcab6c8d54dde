"""Multi-task HTTP serving: one frozen model in memory, many tasks (one small prompt file each), mixed-task batches.

    softprompt serve --prompts DIR [--model NAME|PATH] [--host 127.0.0.1 --port 8000]

Layers (each usable on its own): registry (tasks as softprompt.loaded prompts, prompt/KV cache, admin changes),
pipeline (the stages: decode request -> collate -> predict -> unbatch -> encode response), generation and decoder
(iteration-level decoding), scheduler (queue, policy, lifecycle), http (error bodies, middleware, SSE), app
(FastAPI routers), server (settings and uvicorn). See docs/serving.md.
"""

from softprompt.serve.app import create_app
from softprompt.serve.generation import GenParams
from softprompt.serve.pipeline import Item, collate, unbatch
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
