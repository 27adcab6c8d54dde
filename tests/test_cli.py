"""The command line: train / eval / predict / generate / info / models, their output contracts, and the one-line
errors (exit 2, `softprompt: error: ...` naming file, line, field or flag; no output file left behind).
Also the metrics behind `softprompt eval`. In-process via softprompt.cli.main; one subprocess proves the entry point.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers_train import (
    FAST,
    LABELS,
    TEMPLATE,
    assert_cli_error,
    cls_records,
    fast_env,
    gen_records,
    run,
    run_quiet,
    subprocess_env,
    temp_leftovers,
    train_argv,
    write_jsonl,
)

from softprompt.checkpoint import load_prompt, save_prompt
from softprompt.evaluate import classification_metrics, generation_metrics, token_f1


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with fast_env(monkeypatch):
        yield


@dataclass
class Trained:
    model: Path
    data: Path
    prompt: Path
    summary: dict
    info_child: subprocess.Popen  # `python -m softprompt info PROMPT`, started early (slow start-up)


@pytest.fixture(scope="module")
def trained(tiny_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    """One classify prompt on tiny llama (3 steps, evaluated at the end), shared by the read-only tests."""
    root = tmp_path_factory.mktemp("cli")
    data = write_jsonl(root / "train.jsonl", cls_records())
    prompt = root / "p.safetensors"
    model = tiny_dir("llama")
    with pytest.MonkeyPatch.context() as mp, fast_env(mp):
        rc, out, err = run_quiet(train_argv(model, data, prompt, "--max-steps", "3", "--eval", str(data)))
    assert rc == 0, err
    child = subprocess.Popen(
        [sys.executable, "-m", "softprompt", "info", str(prompt)],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    yield Trained(model, data, prompt, json.loads(out), child)
    if child.poll() is None:
        child.kill()
    child.communicate()


# ---- train / eval / predict / info / models ---------------------------------------------------------------------


def test_train_prints_one_json_summary(trained: Trained) -> None:
    s = trained.summary
    assert s["out"] == str(trained.prompt) and s["steps"] == 3 and s["best_step"] == 3
    assert 0 <= s["accuracy"] <= 1 and s["n"] == 24 and "wall_s" in s


def test_eval_prints_one_json_object(trained: Trained, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, ["eval", "--prompt", str(trained.prompt), "--data", str(trained.data)])
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    m = json.loads(lines[0])
    assert {"accuracy", "macro_f1", "n", "confusion"} <= m.keys()
    assert m["n"] == 24 and m["labels"] == ["a", "b"]  # the verbalizer's labels, read from the prompt file
    conf = m["confusion"]
    assert len(conf) == 2 and all(len(r) == 2 for r in conf) and sum(map(sum, conf)) == 24
    assert m["accuracy"] == pytest.approx((conf[0][0] + conf[1][1]) / 24)
    assert 0 <= m["macro_f1"] <= 1
    # the metrics recorded at the end of training are the ones eval recomputes on the same data
    assert m["accuracy"] == pytest.approx(trained.summary["accuracy"])


def test_eval_and_predict_read_model_template_and_verbalizer_from_the_prompt(
    trained: Trained, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    meta = load_prompt(trained.prompt).meta
    assert meta["base_model"] == str(trained.model)
    assert meta["labels"] == {"labels": ["a", "b"], "words": ["yes", "no"]}
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": "good movie"}])  # no label, no template: from the file
    rc, out, err = run(capsys, ["predict", "--prompt", str(trained.prompt), "--data", str(texts)])
    assert rc == 0, err
    assert json.loads(out)["input"] == "Text: good movie\nAnswer:"  # the template, with its \n decoded
    rc1, out1, _ = run(capsys, ["eval", "--prompt", str(trained.prompt), "--data", str(trained.data)])
    rc2, out2, _ = run(
        capsys, ["eval", "--prompt", str(trained.prompt), "--data", str(trained.data), "--model", str(trained.model)]
    )
    assert rc1 == rc2 == 0 and json.loads(out1) == json.loads(out2)  # default model = the recorded one


def _check_predictions(text: str, n: int) -> list[dict]:
    rows = [json.loads(line) for line in text.splitlines()]
    assert len(rows) == n
    for r in rows:
        assert set(r["probs"]) == {"a", "b"}
        assert math.fsum(r["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["label"] == max(r["probs"], key=r["probs"].get)
    return rows


def test_predict_from_file_to_stdout_and_to_output(
    trained: Trained, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rc, out, err = run(capsys, ["predict", "--prompt", str(trained.prompt), "--data", str(trained.data)])
    assert rc == 0, err
    rows = _check_predictions(out, 24)
    assert rows[0]["input"] == "Text: " + cls_records()[0]["text"] + "\nAnswer:"
    dest = tmp_path / "preds" / "out.jsonl"
    rc, out2, err = run(
        capsys, ["predict", "--prompt", str(trained.prompt), "--data", str(trained.data), "--output", str(dest)]
    )
    assert rc == 0 and out2 == "", err
    assert dest.read_text(encoding="utf-8") == out  # the same JSONL, written atomically
    assert temp_leftovers(tmp_path) == []


def test_predict_from_stdin(trained: Trained, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"text": "good movie"}\n\n{"text": "dull movie", "id": 7}\n'))
    rc, out, err = run(capsys, ["predict", "--prompt", str(trained.prompt), "--data", "-"])
    assert rc == 0, err
    rows = _check_predictions(out, 2)
    assert [r["input"] for r in rows] == ["Text: good movie\nAnswer:", "Text: dull movie\nAnswer:"]


def test_info_prints_metadata_and_bytes(trained: Trained, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, ["info", str(trained.prompt)])
    assert rc == 0, err
    info = json.loads(out)
    assert info["bytes"] == trained.prompt.stat().st_size
    assert info["tensors"] == {"prompt": [4, 32]}
    assert info["num_tokens"] == 4 and info["embed_dim"] == 32
    assert info["base_model"] == str(trained.model) and info["fingerprint"].startswith("sha256:")
    assert info["architecture"] == "LlamaForCausalLM" and info["family"] == "causal"
    assert info["task"] == "classify" and info["template"] == TEMPLATE
    assert info["train_config"]["train"]["max_steps"] == 3
    assert set(info["metrics"]) >= {"accuracy", "macro_f1"}


def test_models_lists_both_aliases(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, ["models"])
    assert rc == 0
    aliases = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert {"smollm2-135m", "minilm-l6"} <= aliases


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_generate_task_train_generate_eval(
    kind: str, tiny_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "gen.jsonl", gen_records(12, field="answer"))
    prompt = tmp_path / "g.safetensors"
    argv = ["train", "--model", str(tiny_dir(kind)), "--train", str(data), "--out", str(prompt), *FAST]
    argv += ["--task", "generate", "--target-field", "answer", "--template", "Q: {text}\\nA:", "--max-steps", "2"]
    rc, out, err = run(capsys, argv)  # the default --init labels falls back to vocab for generation
    assert rc == 0, err
    meta = load_prompt(prompt).meta
    assert meta["task"] == "generate" and meta["target_field"] == "answer" and meta["init"] == "vocab"

    rc, out, err = run(capsys, ["generate", "--prompt", str(prompt), "--input", "say 3", "--max-new-tokens", "4"])
    assert rc == 0, err
    row = json.loads(out)
    assert row["input"] == "say 3" and isinstance(row["output"], str)
    rc, out, err = run(capsys, ["generate", "--prompt", str(prompt), "--data", str(data), "--max-new-tokens", "3"])
    assert rc == 0, err
    outs = [json.loads(line)["output"] for line in out.splitlines()]
    assert len(outs) == 12 and all(isinstance(o, str) for o in outs)
    rc, out, err = run(capsys, ["eval", "--prompt", str(prompt), "--data", str(data), "--max-new-tokens", "3"])
    assert rc == 0, err
    m = json.loads(out)
    assert m["n"] == 12 and 0 <= m["exact_match"] <= 1 and 0 <= m["token_f1"] <= 1


def test_encoder_linear_head_is_saved_and_used_by_eval(
    tiny_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --head linear prompt carries its trained head; eval must score with it, not with a fresh random head."""
    data = write_jsonl(tmp_path / "train.jsonl", cls_records())
    prompt = tmp_path / "b.safetensors"
    argv = ["train", "--model", str(tiny_dir("bert")), "--train", str(data), "--eval", str(data), "--out", str(prompt)]
    rc, out, err = run(
        capsys, [*argv, *FAST, "--head", "linear", "--labels", LABELS, "--max-steps", "3", "--lr", "0.3"]
    )
    assert rc == 0, err
    trained = json.loads(out)
    assert set(load_prompt(prompt).extra) == {"head.linear.weight", "head.linear.bias"}
    rc, out, err = run(capsys, ["eval", "--prompt", str(prompt), "--data", str(data)])
    assert rc == 0, err
    m = json.loads(out)
    assert (m["accuracy"], m["macro_f1"]) == pytest.approx((trained["accuracy"], trained["macro_f1"]))


def test_decoder_linear_head_is_saved_and_used_by_eval(
    tiny_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A decoder trained with --head linear: the head is saved, eval and predict score with it (the same numbers
    as training's evaluation), and it has moved from its start (the verbalizer's output embeddings)."""
    data = write_jsonl(tmp_path / "train.jsonl", cls_records())
    prompt = tmp_path / "l.safetensors"
    argv = ["train", "--model", str(tiny_dir("llama")), "--train", str(data), "--eval", str(data), "--out", str(prompt)]
    rc, out, err = run(capsys, [*argv, *FAST, "--head", "linear", "--labels", LABELS, "--max-steps", "3"])
    assert rc == 0, err
    trained = json.loads(out)
    ck = load_prompt(prompt)
    assert set(ck.extra) == {"head.linear.weight", "head.linear.bias"} and ck.meta["head"] == "linear"
    assert float(ck.extra["head.linear.bias"].abs().max()) > 0  # trained (it starts at 0)
    rc, out, err = run(capsys, ["eval", "--prompt", str(prompt), "--data", str(data)])
    assert rc == 0, err
    m = json.loads(out)
    assert (m["accuracy"], m["macro_f1"]) == pytest.approx((trained["accuracy"], trained["macro_f1"]))
    meta = {k: v for k, v in ck.meta.items() if k != "format"}
    # the head's older names (head.weight/head.bias) load as the same head: the same numbers
    legacy = tmp_path / "legacy.safetensors"
    save_prompt(legacy, ck.prompt, meta, {k.replace("linear.", ""): v for k, v in ck.extra.items()})
    rc, out, err = run(capsys, ["eval", "--prompt", str(legacy), "--data", str(data)])
    assert rc == 0, err
    assert json.loads(out)["accuracy"] == pytest.approx(trained["accuracy"])
    # a head of the wrong shape, or none at all: one line naming the file, exit 2 (eval and the server share this check)
    w = ck.extra["head.linear.weight"]
    bad = {"head.linear.weight": torch.cat([w, w[:1]]), "head.linear.bias": torch.zeros(w.shape[0] + 1)}
    for name, extra, why in [("shape", bad, f"has shape ({w.shape[0] + 1}, {w.shape[1]}), expected"),
                             ("nohead", {}, "a --head linear prompt without its head.linear.* tensors")]:  # fmt: skip
        save_prompt(tmp_path / f"{name}.safetensors", ck.prompt, meta, extra)
        rc, out, err = run(capsys, ["eval", "--prompt", str(tmp_path / f"{name}.safetensors"), "--data", str(data)])
        assert rc == 2 and out == "" and f"{name}.safetensors: " in err and why in err and err.count("\n") == 1, err


def test_headerless_tsv_trains_and_evaluates_with_columns(
    trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--columns names a headerless TSV's cells for training and its evaluation (it was dropped on the way to the
    reader, so examples/configs/agnews.yaml failed on line 2): the same rows as the JSONL give the same numbers."""
    tsv = tmp_path / "train.tsv"
    tsv.write_text("".join(f"{r['text']}\t{r['label']}\n" for r in cls_records()), encoding="utf-8")
    argv = train_argv(trained.model, tsv, tmp_path / "t.safetensors", "--max-steps", "3", "--eval", str(tsv))
    rc, out, err = run(capsys, [*argv, "--columns", "text,label"])
    assert rc == 0, err
    # the JSONL run (the `trained` fixture) saw the same 24 rows in the same order: the same prompt and metrics
    assert json.loads(out)["accuracy"] == pytest.approx(trained.summary["accuracy"])
    ev = ["eval", "--prompt", str(tmp_path / "t.safetensors"), "--data", str(tsv)]
    rc, out, err = run(capsys, [*ev, "--columns", "text,label"])
    assert rc == 0, err
    m = json.loads(out)
    assert m["n"] == 24 and m["accuracy"] == pytest.approx(trained.summary["accuracy"])
    pr = ["predict", "--prompt", str(tmp_path / "t.safetensors"), "--data", str(tsv), "--columns", "text,label"]
    rc, out, err = run(capsys, pr)
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    hits = sum(r["label"] == c["label"] for r, c in zip(rows, cls_records()))
    assert len(rows) == 24 and hits / 24 == pytest.approx(trained.summary["accuracy"])
    rc, out, err = run(capsys, ev)  # without --columns the first row is read as a header: one line naming the file
    assert rc == 2 and out == "" and "train.tsv:2: missing field 'text'" in err and "--columns" in err, err


# ---- errors: exit 2, one line, names the culprit, no output file -----------------------------------------------


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    good = cls_records(8)
    write_jsonl(d / "good.jsonl", good)
    write_jsonl(d / "missing_field.jsonl", good[:2] + [{"txt": "no text here", "label": "a"}] + good[3:])
    write_jsonl(d / "unknown_label.jsonl", good[:4] + [{"text": "odd one", "label": "c"}] + good[5:])
    (d / "empty.jsonl").write_text("")
    lines = [json.dumps(r) for r in good]
    lines[3] = '{"text": "broken", "label": "a"'
    (d / "malformed.jsonl").write_text("\n".join(lines) + "\n")
    write_jsonl(d / "long.jsonl", [good[0], {"text": " ".join(["word"] * 30), "label": "b"}])
    (d / "unknown_key.yaml").write_text("train:\n  lr: 0.1\n  lrr: 0.2\n")
    (d / "broken.yaml").write_text("train:\n  lr: [0.1\n")
    (d / "wrong_type.yaml").write_text("train:\n  max_steps: 1.5\n")
    return d


TRAIN_ERRORS = {
    # name: (data file, extra flags, substrings the one error line must contain)
    "missing-field": ("missing_field.jsonl", [], ["missing_field.jsonl:3:", "missing field 'text'", "--template"]),
    "unknown-label": ("unknown_label.jsonl", [], ["unknown_label.jsonl:5:", "label 'c'", "--labels"]),
    "empty-file": ("empty.jsonl", [], ["empty.jsonl", "no records"]),
    "malformed-json": ("malformed.jsonl", [], ["malformed.jsonl:4:", "malformed JSON"]),
    "label-without-word": ("good.jsonl", ["--labels", "a= ,b=no"], ["--labels", "label=word", "'a='"]),
    "word-tokenises-to-nothing": ("good.jsonl", ["--labels", "a=\u200b,b=no"], ["--labels", "tokenises to nothing"]),
    "over-long-input": (
        "long.jsonl",
        ["--template", "{text}", "--no-truncate", "--max-length", "4"],  # line 1 has 3 tokens, line 2 has 30
        ["long.jsonl:2:", "more than --max-length 4", "--no-truncate"],
    ),
    "template-without-field": ("good.jsonl", ["--template", "no placeholder"], ["--template", "no {field}"]),
    "similarity-head-on-a-decoder": ("good.jsonl", ["--head", "similarity"], ["--head similarity", "lm or linear"]),
    "num-tokens-0": ("good.jsonl", ["--num-tokens", "0"], ["--num-tokens must be >= 1"]),
    "negative-lr": ("good.jsonl", ["--lr=-1"], ["--lr must be > 0"]),
    "unknown-optimizer": ("good.jsonl", ["--optimizer", "sgd"], ["--optimizer", "'sgd'"]),
    "save-every-0": ("good.jsonl", ["--save-every", "0"], ["--save-every must be >= 1"]),
    "not-an-int": ("good.jsonl", ["--max-steps", "many"], ["max_steps", "'many'"]),
    "model-not-found": ("good.jsonl", ["--model", "/nonexistent/model"], ["/nonexistent/model"]),
    "yaml-unknown-key": ("good.jsonl", ["--config", "{bad}/unknown_key.yaml"], ["unknown_key.yaml", "train.lrr"]),
    "yaml-syntax": ("good.jsonl", ["--config", "{bad}/broken.yaml"], ["broken.yaml:", "invalid YAML"]),
    "yaml-fraction-for-int": ("good.jsonl", ["--config", "{bad}/wrong_type.yaml"], ["wrong_type.yaml", "max_steps"]),
    "yaml-missing": ("good.jsonl", ["--config", "{bad}/nope.yaml"], ["--config", "nope.yaml"]),
}


@pytest.mark.parametrize("case", list(TRAIN_ERRORS))
def test_train_error(
    case: str, bad: Path, tiny_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file, extra, needles = TRAIN_ERRORS[case]
    out = tmp_path / "p.safetensors"
    argv = train_argv(tiny_dir("llama"), bad / file, out, "--max-steps", "2")
    argv += [a.replace("{bad}", str(bad)) for a in extra]  # later flags win over train_argv's
    rc, stdout, err = run(capsys, argv)
    assert_cli_error(rc, stdout, err, *needles)
    assert list(tmp_path.iterdir()) == []  # no prompt, no log, no state, no temp file


@pytest.fixture(scope="module")
def foreign_prompts(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prompt files that the tiny llama must refuse."""
    d = tmp_path_factory.mktemp("foreign")
    ck = load_prompt(trained.prompt)
    save_prompt(d / "dim16.safetensors", torch.zeros(4, 16), {k: v for k, v in ck.meta.items() if k != "format"})
    raw = trained.prompt.read_bytes()
    (d / "truncated.safetensors").write_bytes(raw[: len(raw) - 100])
    (d / "text.safetensors").write_text("this is not a safetensors file, just text\n")
    return d


def _eval_errors(trained: Trained, foreign: Path, tiny_dir: Callable[[str], Path], bad: Path) -> dict:
    p, data = str(trained.prompt), str(trained.data)
    return {
        "other-model": (["eval", "--prompt", p, "--data", data, "--model", str(tiny_dir("gpt2"))],
                        ["p.safetensors", "trained on another model", "--allow-other-model"]),
        "other-dim": (["eval", "--prompt", str(foreign / "dim16.safetensors"), "--data", data],
                      ["dim16.safetensors", "prompt dim 16", "embedding dim 32"]),
        "truncated": (["eval", "--prompt", str(foreign / "truncated.safetensors"), "--data", data],
                      ["truncated.safetensors", "truncated"]),
        "not-safetensors": (["eval", "--prompt", str(foreign / "text.safetensors"), "--data", data],
                            ["text.safetensors", "not a safetensors file"]),
        "missing-prompt": (["eval", "--prompt", str(foreign / "nope.safetensors"), "--data", data],
                           ["nope.safetensors", "file not found"]),
        "eval-unknown-label": (["eval", "--prompt", p, "--data", str(bad / "unknown_label.jsonl")],
                               ["unknown_label.jsonl:5:", "label 'c'"]),
        "predict-malformed": (["predict", "--prompt", p, "--data", str(bad / "malformed.jsonl")],
                              ["malformed.jsonl:4:", "malformed JSON"]),
        "predict-missing-field": (["predict", "--prompt", p, "--data", str(bad / "missing_field.jsonl")],
                                  ["missing_field.jsonl:3:", "missing field 'text'"]),
    }  # fmt: skip


EVAL_ERRORS = [
    "other-model",
    "other-dim",
    "truncated",
    "not-safetensors",
    "missing-prompt",
    "eval-unknown-label",
    "predict-malformed",
    "predict-missing-field",
]


@pytest.mark.parametrize("case", EVAL_ERRORS)
def test_prompt_command_error(
    case: str,
    trained: Trained,
    foreign_prompts: Path,
    bad: Path,
    tiny_dir: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv, needles = _eval_errors(trained, foreign_prompts, tiny_dir, bad)[case]
    if argv[0] == "predict":
        argv = [*argv, "--output", str(tmp_path / "preds.jsonl")]
    rc, stdout, err = run(capsys, argv)
    assert_cli_error(rc, stdout, err, *needles)
    assert list(tmp_path.iterdir()) == []  # predict --output wrote nothing


def test_allow_other_model_overrides_the_fingerprint_check(
    trained: Trained, tiny_dir: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "--prompt", str(trained.prompt), "--data", str(trained.data), "--model", str(tiny_dir("gpt2"))]
    rc, out, err = run(capsys, [*argv, "--allow-other-model"])  # same dim (32): allowed on request
    assert rc == 0, err
    assert json.loads(out)["n"] == 24


# ---- the metrics behind `softprompt eval` ---------------------------------------------------------------------


def test_classification_metrics_hand_computed() -> None:
    #            gold: x x x y y z      pred: x x y y z z
    m = classification_metrics([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], ["x", "y", "z"])
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]  # rows gold, columns predicted
    assert m["accuracy"] == pytest.approx(4 / 6) and m["n"] == 6
    # per class F1 = 2TP / (2TP + FP + FN): x 4/5, y 2/4, z 2/3
    assert m["per_class_f1"] == pytest.approx({"x": 0.8, "y": 0.5, "z": 2 / 3})
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_classification_metrics_absent_class_and_empty() -> None:
    m = classification_metrics([0, 0], [0, 0], ["x", "y"])  # y never gold nor predicted: its F1 counts as 0
    assert m["accuracy"] == 1.0 and m["macro_f1"] == pytest.approx(0.5) and m["confusion"] == [[2, 0], [0, 0]]
    assert classification_metrics([], [], ["x"])["accuracy"] == 0.0


@pytest.mark.parametrize(
    "pred,gold,f1",
    [
        ("Denver Broncos", "Denver Broncos", 1.0),
        ("the Denver Broncos.", "Denver Broncos", 1.0),  # articles and punctuation are normalised away
        ("Broncos", "Denver Broncos", 2 * 1.0 * 0.5 / 1.5),  # precision 1, recall 1/2
        ("the cat sat on the mat", "a cat on a mat", 2 * 0.75 * 1.0 / 1.75),  # 3 of 4 predicted tokens match
        ("Santa Clara", "Denver Broncos", 0.0),
        ("", "", 1.0),
        ("the", "Denver", 0.0),  # nothing left of the prediction after normalisation
    ],
)
def test_token_f1_squad_values(pred: str, gold: str, f1: float) -> None:
    assert token_f1(pred, gold) == pytest.approx(f1)


def test_generation_metrics_exact_match_and_mean_f1() -> None:
    m = generation_metrics(["The Broncos!", "Denver", "Carolina Panthers"], ["broncos", "Denver Broncos", "Panthers"])
    assert m["n"] == 3
    assert m["exact_match"] == pytest.approx(1 / 3)
    assert m["token_f1"] == pytest.approx((1.0 + 2 / 3 + 2 / 3) / 3)


# ---- last: the child process started by the `trained` fixture has had the whole module to start up -------


def test_info_via_python_dash_m(trained: Trained, capsys: pytest.CaptureFixture[str]) -> None:
    """The real entry point (`python -m softprompt`) in a child process prints the same JSON as in-process."""
    out, err = trained.info_child.communicate(timeout=300)
    assert trained.info_child.returncode == 0, err.decode()
    rc, inproc, _ = run(capsys, ["info", str(trained.prompt)])
    assert json.loads(out) == json.loads(inproc)


def test_help_and_config_import_without_torch() -> None:
    """Building the command tree (every subcommand's flags) imports neither torch nor transformers."""
    code = (
        "import sys, softprompt, softprompt.cli as c; p = c.build_parser()\n"
        "for cmd in ('train', 'eval', 'predict', 'generate', 'serve', 'export', 'import', 'train-multi', 'similarity'):\n"
        "    assert cmd in p._subparsers._group_actions[0].choices, cmd\n"
        "heavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert softprompt.RunConfig().train.lr > 0 and 'torch' not in sys.modules  # a light lazy export\n"
        "assert callable(softprompt.load_backbone) and 'torch' in sys.modules  # a heavy one loads on first use\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(
        [sys.executable, "-m", "softprompt", "train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "--train.lr" in r.stdout


# ---- hardening: refused at once, one error line, never a hang or a traceback ----------------------------------
def _gen_prompt(tiny_dir: Callable[[str], Path], path: Path) -> Path:
    from serve_support import load, make_prompt

    d = tiny_dir("llama")
    return make_prompt(path, load(d), d, task="generate", template="Q: {text} A:")


@pytest.mark.timeout(60)
def test_info_on_a_fifo_or_symlink_loop_is_an_error_not_a_hang(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os

    fifo = tmp_path / "p.safetensors"
    os.mkfifo(fifo)
    assert_cli_error(*run(capsys, ["info", str(fifo)]), "not a regular file")
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    assert_cli_error(*run(capsys, ["info", str(loop)]), "symbolic links")


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--max-new-tokens", "100000000"], "positions"),  # past the model's 512 positions
        (["--max-new-tokens", "0"], "--max-new-tokens must be"),
        (["--num-beams", "0"], "--num-beams must be"),
        (["--top-p", "2"], "--top-p must be"),
        (["--top-p", "nan"], "--top-p must be"),
        (["--do-sample", "--temperature", "inf"], "--temperature must be"),
        (["--do-sample", "--temperature", "0"], "--temperature must be"),
        (["--top-k", "-1"], "--top-k must be"),
        (["--seed", str(2**70)], "--seed must be"),
    ],
)
def test_generate_refuses_out_of_range_settings(
    flags: list[str], needle: str, tiny_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = _gen_prompt(tiny_dir, tmp_path / "g.safetensors")
    argv = ["generate", "--prompt", str(prompt), "--input", "hello", "--device", "cpu", *flags]
    assert_cli_error(*run(capsys, argv), needle)


def test_generate_within_the_position_limit_runs(
    tiny_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = _gen_prompt(tiny_dir, tmp_path / "g.safetensors")
    rc, out, err = run(capsys, ["generate", "--prompt", str(prompt), "--input", "hi", "--max-new-tokens", "3",
                                "--device", "cpu"])  # fmt: skip
    assert rc == 0, err
    assert isinstance(json.loads(out)["output"], str)


def test_eval_and_predict_refuse_invalid_prompt_tensors(
    trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = load_prompt(trained.prompt)
    meta = {k: v for k, v in ck.meta.items() if k not in ("format", "format_version", "num_tokens", "embed_dim")}
    d = ck.prompt.shape[1]
    w = torch.randn(2, d)
    w[1, 0] = float("inf")
    bad_head = tmp_path / "head.safetensors"
    save_prompt(bad_head, ck.prompt, {**meta, "head": "linear"}, {"head.linear.weight": w,
                "head.linear.bias": torch.zeros(2)})  # fmt: skip
    middle = tmp_path / "middle.safetensors"
    save_prompt(middle, ck.prompt, {**meta, "position": "middle"})
    from safetensors.torch import save_file

    from softprompt.checkpoint import _encode_meta

    ints = tmp_path / "int.safetensors"
    save_file({"prompt": torch.ones(3, d, dtype=torch.int64)}, str(ints), metadata=_encode_meta(meta))
    empty = tmp_path / "empty.safetensors"
    save_file({"prompt": torch.zeros(0, d)}, str(empty), metadata=_encode_meta(meta))
    for path, needle in ((bad_head, "NaN or inf"), (middle, "position"), (ints, "int64"), (empty, "0 rows")):
        assert_cli_error(*run(capsys, ["predict", "--prompt", str(path), "--data", str(trained.data)]), needle)
        assert_cli_error(*run(capsys, ["eval", "--prompt", str(path), "--data", str(trained.data)]), needle)
