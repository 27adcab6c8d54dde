"""The README's main job: teach SmolLM2-135M to route support tickets through a soft prompt.

    make demo        # or: python examples/demo.py [--steps N] [--out runs/demo/tickets.safetensors]

1. loads smollm2-135m (the first run converts the GGUF file once to a safetensors cache),
2. measures zero-shot accuracy on the held-out tickets (same template and label words, no prompt),
3. trains a 20-token soft prompt (the backbone stays frozen) on examples/data/train.jsonl,
4. prints zero-shot vs tuned accuracy, saves the prompt and shows a few predictions.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from softprompt import Predictor, RunConfig, load_backbone, train
from softprompt.api import zero_shot

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
TEMPLATE = "Ticket: {text}\nDepartment:"
LABELS = "billing=billing,shipping=shipping,technical=technical,account=account"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default="runs/demo/tickets.safetensors")
    args = ap.parse_args()
    t0 = time.time()

    cfg = RunConfig()
    cfg.model.model = "smollm2-135m"
    cfg.data.train, cfg.data.eval = str(DATA / "train.jsonl"), str(DATA / "test.jsonl")
    cfg.data.template, cfg.data.labels = TEMPLATE, LABELS
    cfg.prompt.num_tokens, cfg.prompt.init = 20, "labels"
    cfg.train.lr = 0.03  # a short run: a higher rate than the 300-step default (0.01)
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.eval_every = args.steps, 16, max(1, args.steps // 3)
    cfg.train.out, cfg.train.plot = args.out, True

    print("== 1. backbone", flush=True)
    bb = load_backbone(cfg.model)
    n_params = sum(p.numel() for p in bb.model.parameters())
    print(f"{bb.model_id}: {bb.architecture}, {n_params / 1e6:.1f}M frozen parameters, fingerprint {bb.fingerprint}")

    print("\n== 2. zero-shot (no prompt) on the held-out tickets", flush=True)
    zero = zero_shot(bb, cfg.data, cfg.data.eval)
    print(f"zero-shot accuracy {zero['accuracy']:.1%} (n={zero['n']}, chance 25%)")

    print(
        f"\n== 3. prompt tuning: {cfg.prompt.num_tokens} tokens x {bb.embed_dim} = "
        f"{cfg.prompt.num_tokens * bb.embed_dim:,} trainable parameters, {args.steps} steps",
        flush=True,
    )
    res = train(cfg, backbone=bb, log=lambda s: print(s, file=sys.stderr))

    print("\n== 4. result", flush=True)
    pred = Predictor.load(res.out, backbone=bb)
    tuned = pred.evaluate(cfg.data.eval)
    size = Path(res.out).stat().st_size
    print(
        f"| model | trainable params | held-out accuracy |\n|---|---|---|\n"
        f"| zero-shot | 0 | {zero['accuracy']:.1%} |\n"
        f"| soft prompt ({cfg.prompt.num_tokens} tokens) | {cfg.prompt.num_tokens * bb.embed_dim:,} "
        f"({cfg.prompt.num_tokens * bb.embed_dim / n_params:.4%}) | {tuned['accuracy']:.1%} |"
    )
    print(f"prompt saved to {res.out} ({size:,} bytes); curves in {Path(res.out).with_suffix('.png')}")
    print("confusion (rows gold, columns predicted):", tuned["labels"])
    for lab, row in zip(tuned["labels"], tuned["confusion"]):
        print(f"  {lab:<10} {row}")

    print("\n== 5. a few predictions", flush=True)
    samples = [
        "I was charged twice for the same order last week, please send the money back.",
        "The courier left my box at the wrong house and nobody knows where it is now.",
        "Ever since the last update the app closes as soon as I open the camera page.",
        "I can no longer sign in because the login code never arrives on my phone.",
    ]
    for s, p in zip(samples, pred.predict([TEMPLATE.format(text=s) for s in samples])):
        print(f"  {p['label']:<10} {max(p['probs'].values()):.2f}  {s}")
    print(f"\ndone in {time.time() - t0:.0f} s (torch threads: {torch.get_num_threads()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
