"""Routed prompts (`--method routed`): K prompts and a router; every input runs under exactly one of them.

In the manner of SMoP (Choi et al. 2023, sparse mixture-of-prompts) and prompt pools (L2P, Wang et al. 2022): K
short prompts ("routes") of P = --num-tokens tokens each, and a linear router that scores each input from a cheap
representation needing no extra backbone pass: softprompt.dynamic.input_summary, the (layer-normalised) mean of
the input's frozen token embeddings.

    x = input_summary(input)                    (d,)
    logits = W (x - c) + b                      (K,)   router: W (K, d), b (K,); c (d,) the centre (below)
    inference: route = argmax(logits); the row runs under route P_route (P, d) unchanged (no gate scaling)

Inference is a mixed-prefix batch, the path the server already has: the K routes are K prefix entries, each built
once (decoder-only: its keys/values cached and shared by every row that takes it), and each row indexes its route.

Training: top-1 routing with the straight-through Gumbel-softmax estimator (Jang et al. 2017, "ST Gumbel"):
    y = (logits + g) / tau, g ~ Gumbel(0, 1), tau = 1;  soft = softmax(y);  route = argmax(y)
    prompt_i = P_route + sum_k (soft_k - stopgrad(soft_k)) P_k
The second term is exactly zero in value, so every row trains under exactly its route's prompt (the forward is the
inference forward with a sampled route), while the router gets the straight-through gradient
d loss / d soft_k = <d loss / d prompt_i, P_k>; each route's tensor gets gradient only from the rows that took it.
The Gumbel noise explores routes (SMoP perturbs its router's scores for the same reason). Training rows are per-row
prompts, concatenated in front of the input (one pass; no K/V sharing while training).
Load balancing (Switch Transformer, Fedus et al. 2022): aux = --balance-weight * K * sum_k f_k * p_k, f_k the share
of the batch's rows routed to k, p_k the mean router probability softmax(logits)_k; added to the training loss.

Against route collapse (the first study, docs/results-dynamic.md: identical routes, a zero router and balance
weight 0.01 sent every evaluation row of SST-2 and AG News to one route):
- Routes start distinct: route k = the --init prompt + --route-noise * rms(init) * N(0, 1) (default 0.1), drawn
  from a CPU generator seeded by --seed. Identical routes give the router exactly no task gradient (its
  straight-through gradient is <d loss / d prompt, P_k - P_j>), so only the load-balancing term moved it at first.
- The router starts small and random, as Switch Transformer's does (W ~ N(0, 0.1 / d), b = 0), not at zero.
- The router scores the centred summary x - c, c the mean summary of the training inputs (fit_inputs, before
  training; a function of the data, so --resume recomputes it). Summaries share most of their direction (cosine
  ~0.8 to their mean on SST-2), so on the raw x the router's weight acts mostly as a bias, which Adam moves by ~lr
  per coordinate, i.e. every row's logits by up to lr * |x|_1 per step: one route can win for every input and the
  saturated softmax then hides it from the balance term (without the centring, the other three changes still
  collapsed on SST-2). Centred, a random router splits the inputs through their mean, and the load is the bias's,
  which the balance term controls.
- --balance-weight defaults to 0.1 (Switch uses 0.01, over thousands of tokens per batch). Chosen, not tuned: the
  first study collapsed at 0.01; 0.1 with the centring kept both routes used on SST-2 and AG News (one value tried).

File: `prompt` (K*P, d), the routes stacked (route k = rows k*P .. k*P+P-1); `routed.router.weight` W (K, d),
`routed.router.bias` (K,), the centre folded in: b - W c, so a file's route is argmax(W x + b') as before the
centre existed (files made before it load and route as they did); metadata `routed` {routes, tokens,
balance_weight, estimator, eval_routes: rows per route in the evaluation at save}. `num_tokens` is the file's
rows, K*P: the position budget reserves K*P positions (a row uses P). Export: none of the formats can hold a
router (PEFT prompt tuning, prompt tables: refused).

Notation: N rows, T tokens, d embedding width, K routes, P tokens per route.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from softprompt.checkpoint import CheckpointError, PromptCheckpoint
from softprompt.dynamic import RowPrefix, input_summary
from softprompt.prefix import Prefix
from softprompt.prompted import PromptedModel

ROUTER = ("routed.router.weight", "routed.router.bias")
ESTIMATOR = "gumbel-softmax straight-through, tau 1"
ROUTER_INIT = 0.1  # router weight ~ N(0, ROUTER_INIT / d): Switch Transformer's scale-0.1 router initialisation


def route(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N,) the route of each row at inference: argmax of the router's logits on x (N, d)."""
    return (x @ weight.to(x).T + bias.to(x)).argmax(-1)


def balance_loss(logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's load-balancing loss K * sum_k f_k p_k (1 when balanced): logits (N, K), chosen (N,)."""
    k = logits.shape[-1]
    f = F.one_hot(chosen, k).float().mean(0)  # (K,) share of rows per route (no gradient)
    p = logits.softmax(-1).mean(0)  # (K,) mean router probability
    return k * (f * p).sum()


class RoutedPrompt(nn.Module):
    """K routes (K, P, d) and the router (K, d) + (K,)."""

    center: torch.Tensor  # (d,) buffer: the router's centre c

    def __init__(self, init: torch.Tensor, k: int, balance_weight: float, *, noise: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"--routes must be >= 1, got {k}")
        g = torch.Generator().manual_seed(seed)  # CPU draws, so the init is the same on every device
        base = init.detach().float().cpu()  # (P, d)
        p, d = base.shape
        scale = noise * float(base.pow(2).mean().sqrt())  # noise relative to the init's RMS
        routes = base[None].repeat(k, 1, 1) + scale * torch.randn(k, p, d, generator=g)  # (K, P, d)
        self.routes = nn.Parameter(routes.to(init.device))
        self.router = nn.Linear(d, k)  # W (K, d), b (K,): on the centred summary x - c
        with torch.no_grad():
            self.router.weight.copy_(torch.randn(k, d, generator=g) * math.sqrt(ROUTER_INIT / d))
            self.router.bias.zero_()
        self.register_buffer("center", torch.zeros(d))  # (d,) the mean training summary (fit_inputs), 0 until set
        self.balance_weight = balance_weight
        self.eval_routes: list[int] | None = None  # rows per route in the latest evaluation (softprompt.train)

    @property
    def router_bias(self) -> torch.Tensor:
        """(K,) the bias on the uncentred summary, as the file holds it: W (x - c) + b = W x + (b - W c)."""
        return self.router.bias - self.router.weight @ self.center

    def fit_inputs(self, pm: PromptedModel, inputs: list[list[int]], batch: int = 256) -> None:
        """Set the router's centre c: the mean summary of the training inputs (a function of the data, recomputed
        identically on --resume; no backbone pass)."""
        total = torch.zeros(self.center.shape[0], dtype=torch.float64)
        for i in range(0, len(inputs), batch):
            b = pm.collate(inputs[i : i + batch])
            total += (
                input_summary(pm, b.ids.to(self.center.device), b.mask.to(self.center.device)).double().sum(0).cpu()
            )
        self.center.copy_((total / max(len(inputs), 1)).float())

    @property
    def num_routes(self) -> int:
        return int(self.routes.shape[0])

    def trainable(self) -> list[nn.Parameter]:
        return [self.routes, *self.router.parameters()]  # routes, router weight, router bias

    def prefix(self, pm: PromptedModel) -> Prefix:
        raise ValueError("--method routed: the prefix depends on the input (row_prefix)")

    eval_prefix = prefix

    def row_prefix(self, pm: PromptedModel, ids: torch.Tensor, mask: torch.Tensor, *, train: bool) -> RowPrefix:
        x = input_summary(pm, ids, mask)  # (N, d)
        if not train:  # the K routes as K entries (each built once), rows = each row's route
            with torch.no_grad():
                r = route(self.router.weight, self.router_bias, x)
                return RowPrefix(pm.build_prefix(list(self.routes.detach())), r, routes=r)
        logits = F.linear(x, self.router.weight, self.router_bias)  # (N, K)
        u = torch.rand(logits.shape).clamp(1e-9, 1 - 1e-9).to(logits.device)  # CPU RNG: restored by --resume
        y = logits - torch.log(-torch.log(u))  # + Gumbel(0, 1)
        soft = y.softmax(-1)  # (N, K)
        chosen = y.argmax(-1)  # (N,)
        # value: exactly routes[chosen] (the second term is 0); gradient: straight-through to the router
        prompts = self.routes[chosen] + torch.einsum("nk,kpd->npd", soft - soft.detach(), self.routes)  # (N, P, d)
        prefix = pm.build_prefix(list(prompts), kv=False)  # one entry per row, concatenated in front of its input
        rows = torch.arange(len(chosen), device=chosen.device)
        aux = self.balance_weight * balance_loss(logits, chosen) if self.balance_weight else None
        return RowPrefix(prefix, rows, aux=aux, routes=chosen)

    def saved(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        k, p, d = self.routes.shape
        meta = {"routes": k, "tokens": p, "balance_weight": self.balance_weight, "estimator": ESTIMATOR}
        if self.eval_routes is not None:
            meta["eval_routes"] = self.eval_routes
        tensors = {ROUTER[0]: self.router.weight.detach(), ROUTER[1]: self.router_bias.detach()}
        return self.routes.detach().reshape(k * p, d), tensors, {"method": "routed", "routed": meta}


def checkpoint_routes(ckpt: PromptCheckpoint) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """routes (K, P, d), router weight (K, d) and bias (K,) of a routed prompt file, checked (CheckpointError)."""
    meta = ckpt.meta.get("routed")
    if not isinstance(meta, dict) or not all(isinstance(meta.get(f), int) for f in ("routes", "tokens")):
        raise CheckpointError(f"{ckpt.path}: a routed prompt needs metadata routed {{routes, tokens}}")
    k, p = int(meta["routes"]), int(meta["tokens"])
    w, b = ckpt.extra.get(ROUTER[0]), ckpt.extra.get(ROUTER[1])
    d = ckpt.embed_dim
    if k < 1 or p < 1 or ckpt.prompt.shape[0] != k * p:
        raise CheckpointError(f"{ckpt.path}: 'prompt' has {ckpt.prompt.shape[0]} rows, metadata routed says {k}x{p}")
    if w is None or b is None or tuple(w.shape) != (k, d) or tuple(b.shape) != (k,):
        raise CheckpointError(f"{ckpt.path}: a routed prompt needs '{ROUTER[0]}' ({k}, {d}) and '{ROUTER[1]}' ({k},)")
    return ckpt.prompt.reshape(k, p, d), w, b


class _Routed:
    name = "routed"
    needs_kv = False
    per_row = True
    exports: frozenset[str] = frozenset()  # PEFT prompt tuning and prompt tables hold one prompt, no router

    def create(self, pm: PromptedModel, init: torch.Tensor, cfg: Any) -> RoutedPrompt:
        # seeded by --seed: train seeds torch with it before the prompt is created (torch.initial_seed)
        rp = RoutedPrompt(init, cfg.routes, cfg.balance_weight, noise=cfg.route_noise, seed=torch.initial_seed())
        return rp.to(pm.backbone.device)

    def load_prefix(self, pm: PromptedModel, ckpt: PromptCheckpoint, *, kv: bool | None) -> Prefix:
        """The K routes as K entries (each built once: decoder-only, its own keys/values)."""
        routes, _, _ = checkpoint_routes(ckpt)
        return pm.build_prefix(list(routes.to(pm.backbone.device)), kv=kv)

    def rows(
        self, pm: PromptedModel, ckpt: PromptCheckpoint, ids: torch.Tensor, mask: torch.Tensor, *, kv: bool
    ) -> tuple[Prefix | None, torch.Tensor]:
        _, w, b = checkpoint_routes(ckpt)
        return None, route(w, b, input_summary(pm, ids, mask))

    def num_routes(self, ckpt: PromptCheckpoint) -> int:
        return int(checkpoint_routes(ckpt)[0].shape[0])

    def vectors(self, ckpt: PromptCheckpoint) -> torch.Tensor:
        """(K*P, d): every route's rows."""
        return ckpt.prompt.double()


METHOD = _Routed()
