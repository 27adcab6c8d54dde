"""softprompt.distill: a soft prompt learns the class distribution of the same model with a hard prompt in context,
through the one trainer; the loss is the KL of the model's own forwards."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from softprompt import trainer as trainer_mod
from softprompt.checkpoint import load_prompt
from softprompt.cli import main
from softprompt.config import RunConfig
from softprompt.data import DataError, load_samples
from softprompt.distill import DistillObjective
from softprompt.icl import build_context, choose_demos, text_context
from softprompt.models import Backbone
from softprompt.prompted import PromptedModel
from softprompt.task import BoundTask
from softprompt.train import build_objective, run_files
from softprompt.trainer import fit

WORDS = ["good", "great", "bad", "awful", "fine", "nice", "poor", "dull"]


def write(path: Path, n: int, offset: int = 0) -> Path:
    rows = [{"text": f"{WORDS[(i * 3) % 8]} film {i + offset}", "label": "a" if i % 3 else "b"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def student_config(tmp_path: Path, model_dir: Path) -> RunConfig:
    """The student's run: 16 training and 6 evaluation rows, 3 vocab-init tokens, 6 steps of batch 8."""
    cfg = RunConfig()
    cfg.model.model, cfg.model.device = str(model_dir), "cpu"
    cfg.data.train, cfg.data.eval = str(write(tmp_path / "t.jsonl", 16)), str(write(tmp_path / "e.jsonl", 6, 50))
    cfg.data.template, cfg.data.labels = "Review: {text}\nAnswer:", "a=yes,b=no"
    cfg.prompt.num_tokens, cfg.prompt.init = 3, "vocab"
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.lr, cfg.train.warmup_steps = 6, 8, 0.05, 0
    cfg.train.eval_every, cfg.train.progress, cfg.train.out = 3, False, str(tmp_path / "s.safetensors")
    return cfg


def setup(tmp_path: Path, bb: Backbone, model_dir: Path) -> tuple[RunConfig, DistillObjective]:
    cfg = student_config(tmp_path, model_dir)
    base = build_objective(cfg, bb, log=lambda *a: None)
    demos_file = write(tmp_path / "demos.jsonl", 8, 100)
    pool = load_samples(str(demos_file), base.spec.data_config(), base.spec.verbalizer)
    ctx = build_context(BoundTask(base.spec, base.pm, num_tokens=0), choose_demos(pool, 4, balanced=True))
    return cfg, DistillObjective(base, ctx)


@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_loss_is_the_kl_of_the_models_own_forwards(
    tmp_path: Path, sharp_backbone: Callable[[str], Backbone], tiny_models_root: Path, temperature: float
) -> None:
    bb = sharp_backbone("llama")
    _, obj = setup(tmp_path, bb, tiny_models_root / "sharp-llama")
    obj.temperature = temperature  # --teacher-temperature: the teacher's class distribution is softmax(scores / T)
    rows = obj.base.train_set[:4]
    got = obj.loss(rows)
    pm, words = obj.base.pm, [v[0] for v in obj.base.task.label_ids]
    prompt = obj.base.prompt.embedding.detach()
    want = []
    with torch.no_grad():
        for e in rows:  # teacher: [BOS][context tokens][input] as ids; student: hand-built embeddings
            ids = torch.tensor([pm.prefix_ids + obj.teacher.token_ids + e.input_ids])
            t = (bb.model(input_ids=ids).logits[0, -1].float().log_softmax(-1)[words] / temperature).log_softmax(-1)
            emb = bb.model.get_input_embeddings()
            x = torch.cat([emb(torch.tensor(pm.prefix_ids)), prompt, emb(torch.tensor(e.input_ids))])[None]
            s = bb.model(inputs_embeds=x).logits[0, -1].float().log_softmax(-1)[words].log_softmax(-1)
            want.append((t.exp() * (t - s)).sum())
    torch.testing.assert_close(got.detach(), torch.stack(want).mean(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("labels", "at"), [("a=yes,b=no", "answer"), ("a=yes please,b=no", "answer"),
                                           ("a=yes,b=no", "input")])  # fmt: skip
def test_vocab_kl_adds_the_whole_vocabulary_kl_of_the_models_own_forwards(
    tmp_path: Path, sharp_backbone: Callable[[str], Backbone], tiny_models_root: Path, labels: str, at: str
) -> None:
    """--vocab-kl: + w * KL over the whole next-token distribution (T = 1) at the answer position, or (--vocab-kl-at
    input) its mean over every input position of the batch; the class term unchanged (sharpened by T), with
    one-token verbalizers (the scores read off that distribution) and multi-token ones (label_scores' own)."""
    bb = sharp_backbone("llama")
    cfg = student_config(tmp_path, tiny_models_root / "sharp-llama")
    cfg.data.labels = labels
    base = build_objective(cfg, bb, log=lambda *a: None)
    ctx = text_context(base.pm, "Label each review.\n\n")
    rows = [dataclasses.replace(e, input_ids=e.input_ids[i % 3 :]) for i, e in enumerate(base.train_set[:4])]
    assert len({len(e.input_ids) for e in rows}) == 3  # a padded batch
    plain = DistillObjective(base, ctx, temperature=0.5).loss(rows).detach()
    got = DistillObjective(base, ctx, temperature=0.5, vocab_kl=0.7, vocab_at=at).loss(rows).detach()
    pm, prompt, emb = base.pm, base.prompt.embedding.detach(), bb.model.get_input_embeddings()
    kls = []
    with torch.no_grad():
        for e in rows:  # teacher: [BOS][context][input] as ids; student: hand-built embeddings
            n = len(e.input_ids)
            ids = torch.tensor([pm.prefix_ids + ctx.token_ids + e.input_ids])
            t = bb.model(input_ids=ids).logits[0, -n:].float().log_softmax(-1)  # (n, V): after each input token
            x = torch.cat([emb(torch.tensor(pm.prefix_ids)), prompt, emb(torch.tensor(e.input_ids))])[None]
            s = bb.model(inputs_embeds=x).logits[0, -n:].float().log_softmax(-1)
            kl = (t.exp() * (t - s)).sum(-1)  # (n,)
            kls.append(kl if at == "input" else kl[-1:])
    want = torch.cat(kls).mean()  # input: over every real position of the batch; answer: over the rows
    torch.testing.assert_close(got - plain, 0.7 * want, rtol=1e-4, atol=1e-6)
    assert float(plain) > 0


def test_distill_refuses_a_head(tmp_path: Path, sharp_backbone: Callable[[str], Backbone], tiny_models_root: Path):
    bb = sharp_backbone("llama")
    cfg = student_config(tmp_path, tiny_models_root / "sharp-llama")
    cfg.data.head = "linear"
    base = build_objective(cfg, bb, log=lambda *a: None)
    ctx = text_context(base.pm, "Label each review.\n\n")
    with pytest.raises(DataError, match="distill: --head: the student is scored by the verbalizer"):
        DistillObjective(base, ctx)


def test_distillation_trains_through_the_one_trainer_and_records_its_teacher(
    tmp_path: Path, sharp_backbone: Callable[[str], Backbone], tiny_models_root: Path
) -> None:
    bb = sharp_backbone("llama")
    cfg, obj = setup(tmp_path, bb, tiny_models_root / "sharp-llama")
    rows = obj.base.train_set[:8]
    before = float(obj.loss(rows))
    res = fit(obj, cfg, run_files(cfg), log=lambda *a: None)
    assert res.steps == 6 and float(obj.loss(rows)) < before  # the student moved towards the teacher
    ck = load_prompt(tmp_path / "s.safetensors")  # an ordinary prompt file
    d = ck.meta["distill"]
    assert d["k"] == 4 and d["context_tokens"] == len(obj.teacher.token_ids) and d["student_tokens"] == 3
    assert d["context_sha256"] == obj.teacher.sha256 and d["compression"] == round(d["context_tokens"] / 3, 2)
    assert 0.0 <= d["agreement"] <= 1.0 and "eval_agreement" in res.history[2]


def test_a_deep_student_starts_where_the_plain_prompt_of_its_init_starts_and_trains(
    tmp_path: Path, sharp_backbone: Callable[[str], Backbone], tiny_models_root: Path
) -> None:
    """--method deep as the student (per-layer K/V, bench.compile's distill-deep): initialised from the hard prompt's
    first tokens it computes exactly the plain prompt of the same --init (whose loss the test above checks against
    the model's own forwards), and it trains to an ordinary deep prompt file with the distill metadata."""
    bb = sharp_backbone("llama")
    objs = {}
    for method in ("prompt", "deep"):
        cfg = student_config(tmp_path, tiny_models_root / "sharp-llama")
        cfg.prompt.init, cfg.prompt.method = 'text:"good film awful"', method
        cfg.train.max_steps, cfg.train.eval_every, cfg.train.out = 4, 0, str(tmp_path / f"{method}.safetensors")
        base = build_objective(cfg, bb, log=lambda *a: None)
        ctx = text_context(base.pm, "good film awful dull. Answer yes or no.")
        objs[method] = (cfg, DistillObjective(base, ctx, temperature=0.5))
    rows = objs["prompt"][1].base.train_set[:6]
    plain, deep = (float(objs[m][1].loss(rows).detach()) for m in ("prompt", "deep"))
    assert plain > 1e-4 and deep == pytest.approx(plain, rel=1e-4, abs=1e-6)
    cfg, obj = objs["deep"]
    res = fit(obj, cfg, run_files(cfg), log=lambda *a: None)
    assert res.steps == 4 and float(obj.loss(rows).detach()) < deep
    ck = load_prompt(tmp_path / "deep.safetensors")
    assert ck.meta["method"] == "deep" and ck.meta["distill"]["student_tokens"] == 3
    assert ck.meta["distill"]["teacher_temperature"] == 0.5


# ---- token-level KL (generation tasks) --------------------------------------------------------------------
def test_generation_loss_is_the_token_level_kl_of_the_models_own_forwards(
    tmp_path: Path, sharp_backbone: Callable[[str], Backbone], tiny_models_root: Path
) -> None:
    bb = sharp_backbone("llama")
    cfg = RunConfig()
    cfg.model.model, cfg.model.device = str(tiny_models_root / "sharp-llama"), "cpu"
    rows = [{"text": f"{WORDS[i % 8]} film {i}", "target": f"{WORDS[(i + 3) % 8]} {'plot ' * (i % 3)}end"}
            for i in range(6)]  # fmt: skip
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg.data.train, cfg.data.task, cfg.data.template = str(tmp_path / "g.jsonl"), "generate", "Q: {text}\nA:"
    cfg.prompt.num_tokens, cfg.prompt.init, cfg.train.progress = 3, "vocab", False
    base = build_objective(cfg, bb, log=lambda *a: None)
    ctx = text_context(base.pm, "Q: good film\nA: great end\n\nQ: bad film\nA: dull plot end\n\n")
    obj = DistillObjective(base, ctx)
    rows_ = obj.base.train_set[:4]
    assert all(e.target_ids for e in rows_)  # the file's targets are the continuations
    got = obj.loss(rows_)
    pm, emb = obj.base.pm, bb.model.get_input_embeddings()
    prompt = obj.base.prompt.embedding.detach()
    kl_sum, n_tok = torch.zeros(()), 0
    with torch.no_grad():
        for e in rows_:  # teacher: [BOS][context][input][target] as ids; student: hand-built embeddings
            y = e.target_ids or []
            ids = pm.prefix_ids + ctx.token_ids + e.input_ids + y
            t = bb.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
            t = t[len(ids) - len(y) - 1 : len(ids) - 1]  # (M, V): the states that predict y
            x = torch.cat([emb(torch.tensor(pm.prefix_ids)), prompt, emb(torch.tensor(e.input_ids + y))])[None]
            s = bb.model(inputs_embeds=x).logits[0].float().log_softmax(-1)
            s = s[x.shape[1] - len(y) - 1 : x.shape[1] - 1]
            kl_sum += (t.exp() * (t - s)).sum()
            n_tok += len(y)
    torch.testing.assert_close(got.detach(), kl_sum / n_tok, rtol=1e-4, atol=1e-6)
    m = obj.evaluate().metrics if obj.has_eval else obj._token_agreement()
    assert 0.0 <= m["agreement"] <= 1.0


# ---- `softprompt distill` on the command line ---------------------------------------------------------------
TEMPLATE, LABELS = r"Review: {text}\nAnswer:", "a=yes,b=no"


def unlabelled(path: Path, n: int, offset: int = 0) -> Path:
    path.write_text("".join(json.dumps({"text": f"{WORDS[(i * 5) % 8]} film {i + offset}"}) + "\n" for i in range(n)))
    return path


def distill_argv(model: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "distill", "--model", str(model), "--device", "cpu", "--no-progress", "--template", TEMPLATE,
        "--labels", LABELS, "--num-tokens", "3", "--init", "vocab", "--batch-size", "4", "--lr", "0.05",
        "--warmup-steps", "0", "--max-steps", "4", "--eval", str(write(tmp_path / "e.jsonl", 6, 50)), *extra,
    ]  # fmt: skip


def cli(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(("student", "init"), [("prompt", "prompt"), ("deep", "prompt"), ("deep", "anchors")])
def test_cli_distill_writes_an_ordinary_prompt_that_agrees_as_its_metadata_says(
    tmp_path: Path, sharp_backbone: Callable[[str], Backbone], tiny_models_root: Path, capsys, student: str, init: str
) -> None:  # any prompt method; deep: per-layer K/V (the study's), anchors: from the teacher's own K/V
    model = tiny_models_root / "sharp-llama"
    bb = sharp_backbone("llama")
    teacher = "Say yes to good films and no to bad ones.\n\nReview: good film\nAnswer: yes\n\n"
    (tmp_path / "teacher.txt").write_text(teacher)
    out = tmp_path / "s.safetensors"
    train = unlabelled(tmp_path / "u.jsonl", 12)  # no labels: --alpha 0 reads none
    rc, _, err = cli(capsys, distill_argv(model, tmp_path, "--teacher-prompt", str(tmp_path / "teacher.txt"),
                                          "--train", str(train), "--out", str(out), "--method", student,
                                          "--student-init", init))  # fmt: skip
    assert rc == 0, err
    assert load_prompt(out).meta["method"] == student
    d = load_prompt(out).meta["distill"]
    assert d["student_init"] == init
    n_teacher = len(bb.tokenizer(teacher, add_special_tokens=False)["input_ids"])
    assert d["context_sha256"] == hashlib.sha256(teacher.encode()).hexdigest() and d["context_tokens"] == n_teacher
    assert d["student_tokens"] == 3 and d["compression"] == round(n_teacher / 3, 2)
    # the file evals and predicts as any prompt; its predictions agree with the teacher's (the model's own
    # input_ids forward of [BOS] teacher input) on the recorded share of the eval rows
    rc, js, err = cli(capsys, ["predict", "--prompt", str(out), "--data", str(tmp_path / "e.jsonl"), "--device", "cpu"])
    assert rc == 0, err
    preds = [json.loads(line)["label"] for line in js.splitlines()]
    pm = PromptedModel(bb)
    words = [v[0] for v in pm.verbalizer_ids(["yes", "no"], "Review: {text}\nAnswer:")]
    same = 0
    with torch.no_grad():
        for line, p in zip((tmp_path / "e.jsonl").read_text().splitlines(), preds):
            text = "Review: " + json.loads(line)["text"] + "\nAnswer:"
            ids = pm.prefix_ids + bb.tokenizer(teacher + text, add_special_tokens=False)["input_ids"]
            scores = bb.model(input_ids=torch.tensor([ids])).logits[0, -1].log_softmax(-1)[words]
            same += ["a", "b"][int(scores.argmax())] == p
    assert d["agreement"] == pytest.approx(same / len(preds))
    rc, js, err = cli(capsys, ["eval", "--prompt", str(out), "--data", str(tmp_path / "e.jsonl"), "--device", "cpu"])
    assert rc == 0 and json.loads(js)["n"] == 6, err


def test_cli_distill_from_demos_resumes_through_the_trainer(
    tmp_path: Path, tiny_models_root: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_models_root / "sharp-llama"
    demos = write(tmp_path / "demos.jsonl", 8, 100)
    argv = distill_argv(model, tmp_path, "--demos", str(demos), "--k", "4", "--balanced",
                        "--train", str(write(tmp_path / "t.jsonl", 12)), "--alpha", "0.5", "--save-every", "1")  # fmt: skip
    ref, cut = tmp_path / "ref.safetensors", tmp_path / "cut.safetensors"
    rc, _, err = cli(capsys, [*argv, "--out", str(ref)])
    assert rc == 0, err
    d = load_prompt(ref).meta["distill"]
    assert d["k"] == 4 and d["alpha"] == 0.5 and d["context_tokens"] > 0

    class Killed(Exception):
        pass

    save_state = trainer_mod.save_state

    def killing(path, params, opt, sched, step, extra):
        save_state(path, params, opt, sched, step, extra)
        if step == 2:
            raise Killed

    with monkeypatch.context() as mp:
        mp.setattr(trainer_mod, "save_state", killing)
        with pytest.raises(Killed):
            main([*argv, "--out", str(cut)])
    state = str(cut) + ".state"
    rc, _, err = cli(capsys, [*argv, "--k", "3", "--out", str(cut), "--resume", state])
    assert rc == 2 and "--teacher" in err  # another hard prompt: refused, naming it
    rc, _, err = cli(capsys, [*argv, "--out", str(cut), "--resume", state])
    assert rc == 0 and "resumed from" in err, err
    losses = [[json.loads(x)["loss"] for x in p.with_suffix(".log.jsonl").read_text().splitlines()] for p in (ref, cut)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert torch.equal(load_prompt(ref).prompt, load_prompt(cut).prompt)


def test_cli_distill_bad_input_is_one_line_naming_the_flag(tmp_path: Path, tiny_models_root: Path, capsys) -> None:
    model = tiny_models_root / "sharp-llama"
    demos, train = write(tmp_path / "demos.jsonl", 8, 100), write(tmp_path / "t.jsonl", 8)
    long_prompt = tmp_path / "long.txt"
    long_prompt.write_text("good film " * 400)
    out = str(tmp_path / "x.safetensors")
    cases = [
        (["--demos", str(tmp_path / "nope.jsonl")], f"--demos: file not found: {tmp_path / 'nope.jsonl'}"),
        (["--demos", str(demos), "--k", "9"], f"--k 9: the --demos file {demos} has only 8 labelled examples"),
        (["--teacher-prompt", str(long_prompt)], f"--teacher-prompt {long_prompt}: the hard prompt is"),
        ([], "--teacher-prompt or --demos: the hard prompt to compile is required"),
    ]
    for extra, want in cases:
        rc, _, err = cli(capsys, distill_argv(model, tmp_path, "--train", str(train), "--out", out, *extra))
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and want in lines[0], err
    assert not Path(out).exists()


def test_cli_distill_from_self_study_inputs(tmp_path: Path, tiny_models_root: Path, capsys) -> None:
    model = tiny_models_root / "sharp-llama"
    out = tmp_path / "ss.safetensors"
    argv = distill_argv(model, tmp_path, "--demos", str(write(tmp_path / "d.jsonl", 8, 100)), "--k", "4",
                        "--self-study", "6", "--self-study-tokens", "6", "--out", str(out))  # fmt: skip
    rc, _, err = cli(capsys, argv)
    assert rc == 0, err
    assert "self-study: the model wrote 6 inputs" in err
    assert load_prompt(out).meta["distill"]["k"] == 4


# ---- --student-init anchors: a deep student from the teacher context's own keys/values ---------------------------
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_anchor_slots_of_the_whole_context_compute_exactly_the_teacher(
    tmp_path: Path, sharp_backbone: Callable[[str], Backbone], tiny_models_root: Path, kind: str
) -> None:
    """With as many slots as the context has tokens, the anchor init moves all of its keys/values in front of the
    input at shifted positions: the deep student's next-token distribution at the answer position is the teacher's
    own ([BOS][context][input] as input_ids through the model), to float rounding."""
    from softprompt.distill import anchor_kv

    bb = sharp_backbone(kind)
    cfg = student_config(tmp_path, tiny_models_root / f"sharp-{kind}")
    base = build_objective(cfg, bb, log=lambda *a: None)
    pm = base.pm
    ctx = text_context(pm, "good film a\nbad film b\n\n")
    kv, pos = anchor_kv(pm, ctx, base.task.label_ids, len(ctx.token_ids))
    assert pos == list(range(len(ctx.token_ids)))
    student = pm.build_deep_prefix([(kv[i, 0], kv[i, 1]) for i in range(kv.shape[0])])
    rows = base.train_set[:3]
    with torch.no_grad():
        got = pm.next_token_logp(student, None, pm.collate([e.input_ids for e in rows]))  # (B, V)
        for i, e in enumerate(rows):
            ids = torch.tensor([pm.prefix_ids + ctx.token_ids + e.input_ids])
            want = bb.model(input_ids=ids).logits[0, -1].float().log_softmax(-1)
            torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-4)


def test_anchor_init_takes_the_label_words_and_the_last_tokens_and_trains(
    tmp_path: Path, sharp_backbone: Callable[[str], Backbone], tiny_models_root: Path
) -> None:
    """Fewer slots than tokens: the last label-word tokens (each demonstration's answer) and the context's last
    r = max(1, n // 5) tokens; the student's slots start as exactly those keys/values (shifted), then train."""
    bb = sharp_backbone("llama")
    cfg = student_config(tmp_path, tiny_models_root / "sharp-llama")
    cfg.prompt.method, cfg.prompt.num_tokens = "deep", 5
    base = build_objective(cfg, bb, log=lambda *a: None)
    demos = write(tmp_path / "demos.jsonl", 8, 100)
    pool = load_samples(str(demos), base.spec.data_config(), base.spec.verbalizer)
    ctx = build_context(BoundTask(base.spec, base.pm, num_tokens=0), choose_demos(pool, 6, balanced=True))
    obj = DistillObjective(base, ctx, student_init="anchors")
    words = {w[0] for w in base.task.label_ids}
    C = len(ctx.token_ids)
    assert obj.anchors[-1:] == [C - 1]  # r = 1: the last token
    assert len(obj.anchors) == 5 and all(ctx.token_ids[i] in words for i in obj.anchors[:-1])
    label_positions = [i for i in range(C - 1) if ctx.token_ids[i] in words]
    assert obj.anchors[:-1] == label_positions[-4:]  # the last four demonstrations' answers
    start = obj.base.prompt.kv.detach().clone()
    fit(obj, cfg, run_files(cfg), log=lambda *a: None)
    assert not torch.equal(load_prompt(cfg.train.out).extra["deep.keys"], start[:, 0])
    assert load_prompt(cfg.train.out).meta["distill"]["student_init"] == "anchors"


def test_anchor_init_refuses_a_plain_student_and_absolute_positions(
    tmp_path: Path, sharp_backbone: Callable[[str], Backbone], tiny_models_root: Path
) -> None:
    cfg = student_config(tmp_path, tiny_models_root / "sharp-llama")
    base = build_objective(cfg, sharp_backbone("llama"), log=lambda *a: None)
    ctx = text_context(base.pm, "good film a\nbad film b\n\n")
    with pytest.raises(DataError, match="--student-init anchors: the student must be a deep prompt"):
        DistillObjective(base, ctx, student_init="anchors")
    cfg = student_config(tmp_path, tiny_models_root / "sharp-gpt2")
    cfg.prompt.method = "deep"
    base = build_objective(cfg, sharp_backbone("gpt2"), log=lambda *a: None)  # learned absolute positions
    with pytest.raises(DataError, match="--student-init anchors: .*(cannot shift positions|absolute positions)"):
        DistillObjective(base, text_context(base.pm, "good film a\nbad film b\n\n"), student_init="anchors")


def test_anchor_slots_are_the_teachers_keys_rotated_to_their_new_distance(
    sharp_backbone: Callable[[str], Backbone],
) -> None:
    """n < C slots: each slot's key is the teacher's cached key of that token rotated by n - C positions (the
    model's own rotary embedding), so q·k from the input is the teacher's; its value is the teacher's value."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from softprompt.distill import anchor_kv
    from softprompt.icl import context_prefix

    bb = sharp_backbone("llama")
    pm = PromptedModel(bb)
    ctx = text_context(pm, "good film a\nbad film b\nfine plot a\n\n")
    n, C, lead = 4, len(ctx.token_ids), len(pm.prefix_ids)
    kv, pos = anchor_kv(pm, ctx, [[ctx.token_ids[2]]], n)
    teacher = context_prefix(pm, ctx).kv
    assert teacher is not None and len(pos) == n and C > n
    idx = torch.tensor([lead + p for p in pos])
    for layer, (k, v) in enumerate(teacher):
        k_t, v_t = k[0][:, idx], v[0][:, idx]  # (H, n, dh)
        cos, sin = bb.model.model.rotary_emb(k_t, torch.full((1, n), n - C))
        want, _ = apply_rotary_pos_emb(k_t[None], k_t[None], cos, sin)
        torch.testing.assert_close(kv[layer, 0], want[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(kv[layer, 1], v_t, rtol=1e-4, atol=1e-4)


def test_teacher_positions_give_the_student_its_teachers_input_positions(
    tmp_path: Path, sharp_backbone: Callable[[str], Backbone], tiny_models_root: Path
) -> None:
    """--student-positions teacher: a gap of C - n after the n slots, so the input stands where it stood behind the
    C-token context; anchor slots then need no rotation (the teacher's own cached keys/values at those tokens),
    and the student's file records the gap and serves with it."""
    from softprompt.icl import context_prefix
    from softprompt.methods import checkpoint_prefix

    bb = sharp_backbone("llama")
    cfg = student_config(tmp_path, tiny_models_root / "sharp-llama")
    cfg.prompt.method, cfg.prompt.num_tokens = "deep", 4
    cfg.train.eval_every = 0  # one evaluation, at the end: the file holds the final prompt
    base = build_objective(cfg, bb, log=lambda *a: None)
    pm = base.pm
    ctx = text_context(pm, "good film a\nbad film b\nfine plot a\n\n")
    C, lead = len(ctx.token_ids), len(pm.prefix_ids)
    obj = DistillObjective(base, ctx, student_init="anchors", student_positions="teacher")
    assert obj.base.prompt.gap == C - 4
    teacher = context_prefix(pm, ctx).kv
    assert teacher is not None
    idx = torch.tensor([lead + p for p in obj.anchors])
    kv = obj.base.prompt.kv.detach()
    for layer, (k, v) in enumerate(teacher):
        torch.testing.assert_close(kv[layer, 0], k[0][:, idx], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kv[layer, 1], v[0][:, idx], rtol=1e-5, atol=1e-5)
    fit(obj, cfg, run_files(cfg), log=lambda *a: None)
    ck = load_prompt(cfg.train.out)
    assert ck.meta["deep"]["position_gap"] == C - 4 and ck.meta["distill"]["student_positions"] == "teacher"
    rows = obj.base.eval_set
    with torch.no_grad():
        batch = pm.collate([e.input_ids for e in rows])
        served = pm.next_token_logp(checkpoint_prefix(pm, [ck]), None, batch)
        trained = pm.next_token_logp(obj.base.prompt.eval_prefix(pm), None, batch)
    torch.testing.assert_close(served, trained, rtol=1e-5, atol=1e-5)
    plain = build_objective(student_config(tmp_path, tiny_models_root / "sharp-llama"), bb, log=lambda *a: None)
    with pytest.raises(DataError, match="--student-positions teacher: the student must be a deep prompt"):
        DistillObjective(plain, ctx, student_positions="teacher")
