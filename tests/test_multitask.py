"""Multi-task prompt tuning (softprompt.multitask, `softprompt train-multi`).

References: every mixed-task score is checked against the task's prompt run alone on each row (plain
PromptedModel calls, one prompt, one row); every exported file is checked to equal cat(shared, task_k) of the
trained parameters and to predict what the multi-task model predicts for that task.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from tiny import tiny_model_dir  # pytest puts tests/ on sys.path

from softprompt.api import Predictor
from softprompt.checkpoint import load_prompt
from softprompt.models import Backbone, load_backbone
from softprompt.multitask import (
    MultiPrompt,
    MultiTaskError,
    build,
    parse_multi_config,
    run,
    sample_rows,
    train_multi,
)
from softprompt.parsers import add_multitask_parser

SENT = [
    ("a great film", "pos"),
    ("dull and slow", "neg"),
    ("loved every minute", "pos"),
    ("a waste of time", "neg"),
    ("superb acting", "pos"),
    ("boring plot", "neg"),
    ("wonderful music", "pos"),
    ("awful script", "neg"),
]
TOPIC = [
    ("the match ended two nil", "sport"),
    ("stocks fell today", "money"),
    ("new phone released", "tech"),
    ("the striker scored", "sport"),
    ("interest rates rise", "money"),
    ("a faster chip", "tech"),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = tmp_path_factory.mktemp("multi")
    for name, rows in (("sent", SENT), ("topic", TOPIC)):
        (r / f"{name}.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    return r


def backbone(kind: str, root: Path) -> Backbone:
    return load_backbone(str(tiny_model_dir(kind, root / "tiny")), progress=False)


def config(root: Path, out: str, **top) -> dict:
    return {
        "num_tokens": 3,
        "shared_tokens": 2,
        "max_steps": 4,
        "batch_size": 4,
        "lr": 0.05,
        "warmup_steps": 0,
        "progress": False,
        "out": str(root / out),
        "init": "random",
        "tasks": [
            {
                "name": "sent",
                "train": str(root / "sent.jsonl"),
                "eval": str(root / "sent.jsonl"),
                "template": "Review: {text} Sentiment:",
                "labels": "neg=bad,pos=very good",
                "rate": 1,
            },
            {
                "name": "topic",
                "train": str(root / "topic.jsonl"),
                "eval": str(root / "topic.jsonl"),
                "template": "Text: {text} Topic:",
                "labels": "money=money,sport=sport,tech=tech",
                "rate": 2,
            },
        ],
        **top,
    }


# ---- configuration ------------------------------------------------------------------------------------------------
def test_parse_config_defaults_and_overrides(root: Path) -> None:
    raw = config(root, "o", template="{text}", labels=None)
    raw["tasks"][1].pop("template")  # falls back to the top-level template
    mc = parse_multi_config(raw, "multi.yaml", {"lr": 0.2, "shared_tokens": 5, "seed": None})
    assert mc.shared_tokens == 5 and mc.run.train.lr == 0.2 and mc.run.prompt.num_tokens == 3
    assert [t.name for t in mc.tasks] == ["sent", "topic"] and [t.rate for t in mc.tasks] == [1.0, 2.0]
    assert mc.tasks[0].data.template == "Review: {text} Sentiment:" and mc.tasks[1].data.template == "{text}"
    assert mc.out_dir == root / "o"
    as_map = dict(raw, tasks={t["name"]: {k: v for k, v in t.items() if k != "name"} for t in raw["tasks"]})
    assert [t.name for t in parse_multi_config(as_map, "m.yaml").tasks] == ["sent", "topic"]


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c: c.pop("tasks"), "tasks"),
        (lambda c: c["tasks"][0].update(colour="red"), "unknown option.*colour"),
        (lambda c: c["tasks"][1].update(name="sent"), "duplicate"),
        (lambda c: c["tasks"][0].update(rate=0), "rate must be > 0"),
        (lambda c: c["tasks"][0].update(name="a/b"), "name"),
        (lambda c: c["tasks"][1].update(task="generate"), "must be classify or all generate"),
        (lambda c: c["tasks"][0].pop("train"), "train file"),
        (lambda c: c.update(shared_tokens=-1), "shared-tokens"),
        (lambda c: c.update(lr=-1), "--lr"),
    ],
)
def test_parse_config_errors(root: Path, change, match: str) -> None:
    raw = config(root, "o")
    change(raw)
    with pytest.raises(ValueError, match=match):
        parse_multi_config(raw, "multi.yaml")


def test_sampling_is_pure_and_follows_rates() -> None:
    a = sample_rows([10, 20], [1.0, 3.0], 8, seed=1, step=5, micro=0)
    assert a == sample_rows([10, 20], [1.0, 3.0], 8, seed=1, step=5, micro=0)  # resume repeats it
    assert a != sample_rows([10, 20], [1.0, 3.0], 8, seed=1, step=6, micro=0)
    draws = [k for s in range(500) for k, _ in sample_rows([10, 20], [1.0, 3.0], 16, seed=0, step=s, micro=0)]
    share = sum(draws) / len(draws)
    assert abs(share - 0.75) < 0.02  # 8000 draws: sd of the share is about 0.005
    assert all(0 <= i < (10, 20)[k] for s in range(50) for k, i in sample_rows([10, 20], [1, 3], 16, 0, s, 0))


# ---- mixed-task forward == each row alone under its task's prompt -----------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "t5", "bert"])
def test_mixed_batch_matches_rows_alone(kind: str, root: Path) -> None:
    bb = backbone(kind, root)
    raw = config(root, f"mix-{kind}")
    if kind == "bert":
        for t in raw["tasks"]:
            t["head"] = "linear"
    mc = parse_multi_config(raw, "m.yaml")
    mt, mp, trains, _ = build(mc, bb)
    g = torch.Generator().manual_seed(0)
    mp = MultiPrompt(
        torch.randn(2, 32, generator=g), [torch.randn(3, 32, generator=g), torch.randn(3, 32, generator=g)]
    )
    pm = mt.pm
    pairs = [(0, 0), (1, 2), (1, 0), (0, 3), (0, 1), (1, 5)]
    ex = [trains[k][i] for k, i in pairs]
    rows = torch.tensor([k for k, _ in pairs])
    batch = pm.collate([e.input_ids for e in ex], labels=[int(e.label) for e in ex])  # type: ignore[arg-type]
    prefix = pm.build_prefix(mp.prompts())
    got = mt.class_scores(prefix, rows, batch)
    ref = []
    for (k, _), e in zip(pairs, ex):  # reference: one row, one prompt, the task's own labels and head
        pm.head = mt.heads[k]
        one = pm.collate([e.input_ids])
        ref.append(pm.label_scores(pm.build_prefix([mp.prompt(k)]), None, one, mt.tasks[k].label_ids)[0])
    pm.head = None
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    loss = mt.loss(prefix, rows, batch)
    want = torch.stack([F.cross_entropy(r[None], torch.tensor([int(e.label)])) for r, e in zip(ref, ex)]).mean()  # type: ignore[arg-type]
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    # gradients reach the shared rows from both tasks, and each task's rows only from its own
    loss.backward()
    assert mp.shared.grad is not None and mp.shared.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mp.tasks)
    mp.zero_grad()
    only0 = rows == 0
    sub = pm.collate(
        [e.input_ids for e, m in zip(ex, only0) if m], labels=[int(e.label) for e, m in zip(ex, only0) if m]
    )  # type: ignore[arg-type]
    mt.loss(pm.build_prefix(mp.prompts()), rows[only0], sub).backward()
    assert mp.tasks[1].grad is None or mp.tasks[1].grad.abs().sum() == 0


# ---- training, export, serving ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_export_is_shared_plus_task_and_serves_the_same(kind: str, root: Path) -> None:
    bb = backbone(kind, root)
    raw = config(root, f"run-{kind}", save_every=1)
    if kind == "bert":
        for t in raw["tasks"]:
            t["head"] = "linear"
    mc = parse_multi_config(raw, "m.yaml")
    res = train_multi(mc, backbone=bb, log=lambda s: None)
    assert res.steps == 4 and set(res.exports) == {"sent", "topic"}
    # the state holds the final parameters: param.0 = shared, param.1..K = task rows (then heads)
    state = load_file(str(Path(res.out_dir) / "state" / "state.safetensors"))
    assert res.best_step == 4  # evaluation only at the end: the exports hold the final parameters
    mt, _, trains, evals = build(mc, bb)
    for k, name in enumerate(["sent", "topic"]):
        ck = load_prompt(res.exports[name])
        assert ck.meta["method"] == "prompt" and ck.meta["multitask"]["shared_tokens"] == 2
        assert ck.meta["template"] == mc.tasks[k].data.template
        torch.testing.assert_close(ck.prompt, torch.cat([state["param.0"], state[f"param.{k + 1}"]]))
        if kind == "bert":  # the task's own linear head travels with its prompt
            torch.testing.assert_close(ck.extra["head.linear.weight"], state[f"param.{3 + 2 * k}"])
        # served alone, the file predicts what the multi-task model predicts for that task (mixed batch)
        mp_k = MultiPrompt(ck.prompt[:2], [ck.prompt[2:] if j == k else torch.zeros(3, 32) for j in range(2)])
        if kind == "bert":
            mt.heads[k].load_state_dict({n[5:]: v for n, v in ck.extra.items()})  # type: ignore[union-attr]
        mixed = [e for pair in zip(evals[0], evals[1]) for e in pair]
        task_of = [j for _ in range(min(len(evals[0]), len(evals[1]))) for j in (0, 1)]
        probs = mt.probs(mt.pm.build_prefix(mp_k.prompts()), mixed, task_of, batch_size=5)
        mine = torch.stack([p for p, j in zip(probs, task_of) if j == k])
        pred = Predictor.load(res.exports[name], backbone=bb)
        served = pred.probs([e for e, j in zip(mixed, task_of) if j == k])
        torch.testing.assert_close(served, mine, atol=1e-5, rtol=1e-5)
        m = pred.evaluate(mc.tasks[k].data.eval)  # type: ignore[arg-type]
        assert m["accuracy"] == pytest.approx(res.metrics[name]["accuracy"])


def test_resume_gives_the_same_exports(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import softprompt.multitask as mtmod

    bb = backbone("llama", root)
    full = train_multi(parse_multi_config(config(root, "full"), "m.yaml"), backbone=bb, log=lambda s: None)
    part = config(root, "part", save_every=2)
    orig = mtmod.sample_rows

    def killed_at_step_3(sizes, rates, n, seed, step, micro):
        if step >= 2:
            raise KeyboardInterrupt  # the run dies during step 3; the state of step 2 is on disk
        return orig(sizes, rates, n, seed, step, micro)

    monkeypatch.setattr(mtmod, "sample_rows", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_multi(parse_multi_config(part, "m.yaml"), backbone=bb, log=lambda s: None)
    monkeypatch.setattr(mtmod, "sample_rows", orig)
    state = root / "part" / "state"
    assert json.loads((state / "state.json").read_text())["step"] == 2
    r2 = train_multi(parse_multi_config(dict(part, resume=str(state)), "m.yaml"), backbone=bb, log=lambda s: None)
    assert [h["step"] for h in r2.history] == [1, 2, 3, 4]
    for name in ("sent", "topic"):
        torch.testing.assert_close(load_prompt(r2.exports[name]).prompt, load_prompt(full.exports[name]).prompt)


def test_cli_train_multi(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config(root, "cli", model=str(tiny_model_dir("llama", root / "tiny")), max_steps=2)
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump(cfg))
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    add_multitask_parser(sub)
    args = p.parse_args(["train-multi", "--config", str(path), "--out", str(tmp_path / "o"), "--shared-tokens", "1"])
    assert run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 2 and set(out["metrics"]) == {"sent", "topic"}
    assert load_prompt(out["exports"]["sent"]).num_tokens == 1 + 3
    assert run(argparse.Namespace(cmd="predict")) is None
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"tasks": []}))
    with pytest.raises(MultiTaskError):
        run(p.parse_args(["train-multi", "--config", str(bad)]))


def test_generation_tasks_mixed_batch(root: Path, tmp_path: Path) -> None:
    """Two text-to-text tasks: the mixed-batch loss is the token-level loss of each row under its own prompt."""
    for name, pairs in (("upper", [("abc", "a b c"), ("hello", "h e l l o")]), ("copy", [("one two", "one two")])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": a, "target": b}) + "\n" for a, b in pairs))
    raw = {
        "num_tokens": 2,
        "shared_tokens": 1,
        "init": "random",
        "task": "generate",
        "out": str(tmp_path / "o"),
        "tasks": [
            {"name": "upper", "train": str(tmp_path / "upper.jsonl"), "template": "Spell: {text} ->"},
            {"name": "copy", "train": str(tmp_path / "copy.jsonl"), "template": "Copy: {text} ->"},
        ],
    }
    bb = backbone("llama", root)
    mt, mp, trains, _ = build(parse_multi_config(raw, "g.yaml"), bb)
    assert mt.kind == "generate"
    pm = mt.pm
    pairs = [(0, 0), (1, 0), (0, 1)]
    ex = [trains[k][i] for k, i in pairs]
    rows = torch.tensor([k for k, _ in pairs])
    batch = pm.collate([e.input_ids for e in ex], targets=[e.target_ids or [] for e in ex])
    got = mt.loss(pm.build_prefix(mp.prompts()), rows, batch)
    tok_sum, n_tok = 0.0, 0
    for (k, _), e in zip(pairs, ex):
        one = pm.collate([e.input_ids], targets=[e.target_ids or []])
        tok, valid = pm.target_logp(pm.build_prefix([mp.prompt(k)]), None, one)
        tok_sum, n_tok = tok_sum + float(tok.sum()), n_tok + int(valid.sum())
    assert float(got) == pytest.approx(-tok_sum / n_tok, abs=1e-5)
