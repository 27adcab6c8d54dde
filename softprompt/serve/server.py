"""`softprompt serve`: settings, wiring (backbone -> registry -> scheduler -> app) and uvicorn."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from softprompt.checkpoint import CheckpointError, load_prompt
from softprompt.commands import ServeConfig  # ServeConfig: one field per `serve` flag
from softprompt.config import ConfigError, ModelConfig
from softprompt.models import Backbone, load_backbone
from softprompt.serve.app import create_app
from softprompt.serve.limits import ConnLimits, install_flood_filters, protocol_class
from softprompt.serve.metrics import server_metrics
from softprompt.serve.registry import SUFFIX, Registry
from softprompt.serve.scheduler import Scheduler

log = logging.getLogger("softprompt.serve")
TOKEN_ENV = "SOFTPROMPT_ADMIN_TOKEN"


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
    from softprompt.serve.images import build_image_app, image_prompts_in

    app = build_image_app(cfg) if image_prompts_in(cfg.prompts) is not None else build(cfg)[0]  # image tasks
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
