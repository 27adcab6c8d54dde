"""Quality bar: SST-2 with smollm2-135m and softprompt's default recipe.

    python -m bench.quality_sst2 [--train-size 4000] [--steps 300] [--out runs/quality/sst2.safetensors]

Trains a soft prompt (20 tokens, CLI defaults unless flags say otherwise) on a fixed-seed 4,000-example sample of
../shared/data/sst2/train.tsv, evaluates on the full dev set (872), and prints zero-shot and tuned accuracy,
trainable parameters, checkpoint bytes and wall time, then one JSON line. Skips (exit 0, with a reason) when the
shared data is absent. Target: tuned accuracy >= 85%.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TEMPLATE = "Review: {sentence}\nSentiment:"
LABELS = "0=negative,1=positive"


def sample_tsv(src: Path, n: int, seed: int, dst: Path) -> None:
    """A fixed-seed sample of a headered TSV, written to a temp file (the shared data is never copied into the repo)."""
    with open(src, encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header, body = rows[0], rows[1:]
    random.Random(seed).shuffle(body)
    with open(dst, "w", encoding="utf-8") as f:  # rows hold no tabs or newlines: plain join is exact
        f.writelines("\t".join(r) + "\n" for r in [header, *(body[:n] if n else body)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-size", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=0, help="0: the CLI default")
    ap.add_argument("--lr", type=float, default=0.0, help="0: the CLI default")
    ap.add_argument("--optimizer", default="", help="empty: the CLI default")
    ap.add_argument("--num-tokens", type=int, default=20)
    ap.add_argument("--init", default="vocab")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/quality/sst2.safetensors")
    args = ap.parse_args()
    if not (SHARED / "sst2" / "train.tsv").exists():
        print(f"skip: {SHARED / 'sst2'} is absent (the shared benchmark data); nothing measured")
        return 0

    from softprompt import Predictor, RunConfig, load_backbone, train
    from softprompt.api import zero_shot

    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="sst2-"))
    sample_tsv(SHARED / "sst2" / "train.tsv", args.train_size, args.seed, tmp / "train.tsv")
    cfg = RunConfig()
    cfg.data.train, cfg.data.eval = str(tmp / "train.tsv"), str(SHARED / "sst2" / "dev.tsv")
    cfg.data.template, cfg.data.labels = TEMPLATE, LABELS
    cfg.prompt.num_tokens, cfg.prompt.init = args.num_tokens, args.init
    cfg.train.out, cfg.train.seed, cfg.train.plot = args.out, args.seed, True
    if args.steps:
        cfg.train.max_steps = args.steps
    if args.lr:
        cfg.train.lr = args.lr
    if args.optimizer:
        cfg.train.optimizer = args.optimizer
    cfg.train.eval_every = max(1, cfg.train.max_steps // 4)
    cfg.train.eval_max = 0

    bb = load_backbone(cfg.model)
    n_params = sum(p.numel() for p in bb.model.parameters())
    zero = zero_shot(bb, cfg.data, cfg.data.eval)
    print(f"zero-shot dev accuracy: {zero['accuracy']:.4f}", flush=True)

    res = train(cfg, backbone=bb, log=lambda s: print(s, file=sys.stderr))
    tuned = Predictor.load(res.out, backbone=bb).evaluate(cfg.data.eval)
    trainable = cfg.prompt.num_tokens * bb.embed_dim
    out = {
        "zero_shot_accuracy": zero["accuracy"],
        "tuned_accuracy": tuned["accuracy"],
        "tuned_macro_f1": tuned["macro_f1"],
        "best_step": res.best_step,
        "trainable_params": trainable,
        "trainable_share": trainable / n_params,
        "checkpoint_bytes": Path(res.out).stat().st_size,
        "wall_s": round(time.time() - t0, 1),
        "train_wall_s": round(res.wall_s, 1),
        "config": {
            "steps": cfg.train.max_steps,
            "batch": cfg.train.batch_size,
            "lr": cfg.train.lr,
            "optimizer": cfg.train.optimizer,
            "num_tokens": cfg.prompt.num_tokens,
            "init": cfg.prompt.init,
            "train_size": args.train_size,
            "seed": args.seed,
        },
        "target_met": tuned["accuracy"] >= 0.85,
    }
    print(
        f"| | dev accuracy |\n|---|---|\n| zero-shot | {zero['accuracy']:.1%} |\n| prompt tuning | "
        f"{tuned['accuracy']:.1%} |\ntrainable {trainable:,} ({trainable / n_params:.4%}), "
        f"checkpoint {out['checkpoint_bytes']:,} bytes, wall {out['wall_s']} s"
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
