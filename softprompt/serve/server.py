"""`softprompt serve`: settings, wiring (backbone -> registry -> scheduler -> app) and uvicorn."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from softprompt.checkpoint import CheckpointError, load_prompt
from softprompt.config import ConfigError, ModelConfig
from softprompt.models import Backbone, load_backbone
from softprompt.serve.app import create_app
from softprompt.serve.limits import ConnLimits, install_flood_filters, protocol_class
from softprompt.serve.metrics import server_metrics
from softprompt.serve.registry import SUFFIX, Registry
from softprompt.serve.scheduler import MODES, Scheduler

log = logging.getLogger("softprompt.serve")
TOKEN_ENV = "SOFTPROMPT_ADMIN_TOKEN"


@dataclass
class ServeConfig:
    prompts: str = "."
    model: str | None = None  # default: base_model of the first prompt in `prompts`
    host: str = "127.0.0.1"
    port: int = 8000
    admin_token: str | None = None  # default: $SOFTPROMPT_ADMIN_TOKEN; none: admin endpoints disabled
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    timeout_s: float = 60.0
    kv_cache_mb: float = 1024.0
    max_input_tokens: int | None = None
    max_new_tokens: int = 512
    max_upload_mb: float = 16.0
    max_inputs: int = 256
    max_body_mb: float = 8.0  # request bodies of the inference endpoints (413 while reading, chunked or not)
    max_input_chars: int | None = None  # default: the task's token limit x the tokenizer's longest token
    max_connections: int = 1000  # open connections; then idle ones are evicted (408) or new ones refused (503)
    header_timeout_s: float = 10.0  # a request's headers must arrive within this (408, closed)
    body_timeout_s: float = 30.0  # and its body within this after them (408, closed)
    keep_alive_s: float = 5.0  # an idle kept-alive connection is closed after this
    scheduler: str = "mixed"  # mixed | per-task
    no_kv_cache: bool = False
    device: str = "auto"
    dtype: str = "float32"
    allow_other_model: bool = False
    skip_equivalence_check: bool = False
    log_level: str = "info"
    threads: int | None = None  # torch intra-op threads (default: torch's choice)

    def validate(self) -> None:
        if self.scheduler not in MODES:
            raise ConfigError(f"--scheduler must be one of {', '.join(MODES)}, got {self.scheduler!r}")
        for flag, v in (
            ("--max-batch-size", self.max_batch_size),
            ("--max-queue", self.max_queue),
            ("--max-new-tokens", self.max_new_tokens),
            ("--max-inputs", self.max_inputs),
            ("--max-connections", self.max_connections),
        ):
            if v < 1:
                raise ConfigError(f"{flag} must be >= 1, got {v}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.max_input_tokens is not None and self.max_input_tokens < 1:
            raise ConfigError(f"--max-input-tokens must be >= 1, got {self.max_input_tokens}")
        if self.max_input_chars is not None and self.max_input_chars < 1:
            raise ConfigError(f"--max-input-chars must be >= 1, got {self.max_input_chars}")
        for flag, x in (
            ("--max-body-mb", self.max_body_mb),
            ("--header-timeout-s", self.header_timeout_s),
            ("--body-timeout-s", self.body_timeout_s),
            ("--keep-alive-s", self.keep_alive_s),
        ):
            if not (math.isfinite(x) and x > 0):
                raise ConfigError(f"{flag} must be > 0, got {x}")
        values = (self.max_wait_ms, self.timeout_s, self.kv_cache_mb, self.max_upload_mb)
        if (
            not all(math.isfinite(v) for v in values)
            or self.max_wait_ms < 0
            or self.timeout_s <= 0
            or (self.kv_cache_mb < 0 or self.max_upload_mb <= 0)
        ):
            raise ConfigError("--max-wait-ms and --kv-cache-mb must be >= 0, --timeout-s and --max-upload-mb > 0")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        if not Path(self.prompts).is_dir():
            raise ConfigError(f"--prompts: {self.prompts} is not a directory")


def default_model(directory: str | Path) -> str:
    """The base_model recorded in the first prompt of `directory` (sorted by name)."""
    for path in sorted(Path(directory).glob("*" + SUFFIX)):
        if path.name.startswith("."):
            continue
        try:
            name = load_prompt(path).meta.get("base_model")
        except CheckpointError:
            continue
        if name:
            return str(name)
    raise ConfigError(f"--model: not given and no prompt in {directory} records its base_model")


def build(cfg: ServeConfig, backbone: Backbone | None = None) -> tuple[FastAPI, Registry, Scheduler]:
    """Backbone (loaded unless given), registry, scheduler and app for `cfg`."""
    cfg.validate()
    if backbone is None:
        model = cfg.model or default_model(cfg.prompts)
        mcfg = ModelConfig(model, cfg.dtype, cfg.device, skip_equivalence_check=cfg.skip_equivalence_check)
        backbone = load_backbone(mcfg, progress=False)
    registry = Registry(
        backbone,
        cfg.prompts,
        kv_cache_mb=cfg.kv_cache_mb,
        max_input_tokens=cfg.max_input_tokens,
        max_input_chars=cfg.max_input_chars,
        allow_other_model=cfg.allow_other_model,
    )
    metrics = server_metrics()
    scheduler = Scheduler(
        registry,
        max_batch_size=cfg.max_batch_size,
        max_wait_ms=cfg.max_wait_ms,
        max_queue=cfg.max_queue,
        timeout_s=cfg.timeout_s,
        mode=cfg.scheduler,
        kv_cache=not cfg.no_kv_cache,
        metrics=metrics,
    )
    token = cfg.admin_token or os.environ.get(TOKEN_ENV) or None
    app = create_app(
        registry,
        scheduler,
        admin_token=token,
        max_upload_bytes=int(cfg.max_upload_mb * 2**20),
        max_body_bytes=int(cfg.max_body_mb * 2**20),
        max_inputs=cfg.max_inputs,
        max_new_tokens=cfg.max_new_tokens,
        metrics=metrics,
        drain_timeout_s=cfg.timeout_s + 5,
    )
    return app, registry, scheduler


def _logging(level: str) -> None:
    logger = logging.getLogger("softprompt")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())


def serve(cfg: ServeConfig, **uvicorn_kwargs: Any) -> int:
    """Run the server until SIGINT/SIGTERM; in-flight requests are finished before the process exits."""

    _logging(cfg.log_level)
    install_flood_filters()
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    app, registry, _ = build(cfg)
    if not (os.environ.get(TOKEN_ENV) or cfg.admin_token):
        log.info("admin endpoints disabled (no --admin-token / %s)", TOKEN_ENV)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: reachable from other machines", cfg.host)
    config = uvicorn_config(app, cfg, max_connections=_fd_budget(cfg.max_connections), **uvicorn_kwargs)
    _server_class()(config).run()
    return 0


def uvicorn_config(app: FastAPI, cfg: ServeConfig, *, max_connections: int | None = None, **kwargs: Any) -> Any:
    """uvicorn's settings for `app` under `cfg`: the h11 protocol with the connection limits (header and body
    timeouts, connection cap; softprompt.serve.limits), keep-alive, a 16 KiB cap on headers, graceful shutdown."""
    import uvicorn

    limits = ConnLimits(
        max_connections=max_connections or cfg.max_connections,
        header_timeout_s=cfg.header_timeout_s,
        body_timeout_s=cfg.body_timeout_s,
    )
    kwargs.setdefault("log_level", cfg.log_level)
    return uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        timeout_graceful_shutdown=int(cfg.timeout_s) + 5,
        timeout_keep_alive=cfg.keep_alive_s,  # type: ignore[arg-type]  # used as a float (call_later)
        http=protocol_class(limits),
        h11_max_incomplete_event_size=16 * 1024,
        **kwargs,
    )


def _fd_budget(max_connections: int) -> int:
    """Raise the soft limit on open files to the hard one; the connection cap that leaves room for lingering
    refusals and the server's own files (a cap above it would end in "Too many open files" at accept)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            want = hard if hard != resource.RLIM_INFINITY else max(soft, 4 * max_connections + 256)
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
    except (ImportError, ValueError, OSError):
        return max_connections
    budget = max(1, (soft - 256) // 2)
    if budget < max_connections:
        log.warning("--max-connections %d lowered to %d: the open-file limit is %d", max_connections, budget, soft)
    return min(max_connections, budget)


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises the signal that stopped it once it has shut down, so a graceful SIGTERM would still end
        the process with status -15; after a graceful stop on SIGTERM `softprompt serve` exits 0 instead (SIGINT is
        re-raised as usual and reported as an interruption)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list):
                    captured[:] = [s for s in captured if s != signal.SIGTERM]

    return Server
