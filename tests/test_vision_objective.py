"""`softprompt train --task image-classify` end to end through softprompt.cli.main (softprompt.vision.objective,
images, api): tiny saved image models, a tiny generated image folder (4 classes: a bright quadrant), bad images,
the prompt file (fingerprint, processor, classes), eval/predict/info, and refusals that name the file or flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_vision import image_folder, save_tiny_vision

from softprompt.checkpoint import CheckpointError, load_prompt, save_prompt
from softprompt.cli import main
from softprompt.vision.api import ImagePredictor
from softprompt.vision.encoder import VisionModel
from softprompt.vision.vpt import tokens_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    return save_tiny_vision("vit", tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("img")
    return image_folder(root / "train", per_class=6, seed=0), image_folder(root / "val", per_class=3, seed=1)


def _train(model: Path, train: Path, val: Path | None, out: Path, method: str, *extra: str) -> int:
    args = ["train", "--task", "image-classify", "--method", method, "--model", str(model), "--train", str(train),
            "--out", str(out), "--num-tokens", "2", "--max-steps", "30", "--batch-size", "8", "--lr", "0.05",
            "--warmup-steps", "0", "--no-progress", "--device", "cpu", *extra]  # fmt: skip
    if val is not None:
        args += ["--eval", str(val)]
    return main(args)


@pytest.mark.parametrize("method", ["vpt", "vpt-deep"])
def test_train_eval_predict_info(method, vit_dir, data, tmp_path, capsys):
    train, val = data
    out = tmp_path / "p.safetensors"
    assert _train(vit_dir, train, val, out, method) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ck = load_prompt(out)
    assert ck.meta["method"] == method and ck.meta["task"] == "image-classify"
    assert ck.meta["labels"]["labels"] == ["a", "b", "c", "d"]
    vm = VisionModel(__import__("transformers").AutoModel.from_pretrained(str(vit_dir)))
    assert ck.meta["fingerprint"] == vm.fingerprint()
    assert ck.meta["vision"]["processor"]["size"] == {"height": 32, "width": 32}
    assert tokens_of(ck).shape == ((2 if method == "vpt-deep" else 1), 2, 32)
    assert ck.extra["head.linear.weight"].shape == (4, 32)
    # eval through the CLI = the trainer's own final evaluation of the same prompt
    assert main(["eval", "--prompt", str(out), "--data", str(val), "--device", "cpu"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["accuracy"] == pytest.approx(res["accuracy"]) and ev["n"] == 12
    # predict: one row per image, probabilities that sum to 1, the arg-max label
    assert main(["predict", "--prompt", str(out), "--data", str(val), "--device", "cpu"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 12 and all(abs(sum(r["probs"].values()) - 1) < 1e-5 for r in rows)
    assert all(r["label"] == max(r["probs"], key=r["probs"].get) for r in rows)
    # the Python predictor on PIL images and paths gives the same rows
    pred = ImagePredictor.load(str(out), device="cpu")
    from PIL import Image

    paths = sorted(str(p) for p in (val / "a").glob("*.png"))
    by_path = pred.predict(paths)
    by_pil = pred.predict([Image.open(p) for p in paths])
    for a, b in zip(by_path, by_pil):
        assert a["label"] == b["label"] and a["probs"] == pytest.approx(b["probs"])
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == method and info["vision"]["layers"] == 2


def test_vpt_learns_the_task(vit_dir, data, tmp_path, capsys):
    """The quadrant task is learnable: the trained prompt + head beat chance (0.25) clearly on held-out images."""
    train, val = data
    out = tmp_path / "p.safetensors"
    assert _train(vit_dir, train, val, out, "vpt", "--max-steps", "80") == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["accuracy"] >= 0.75


def test_bad_images_name_the_file_or_are_counted(vit_dir, data, tmp_path, capsys):
    train, _ = data
    bad = tmp_path / "bad"
    image_folder(bad, per_class=2)
    (bad / "a" / "broken.png").write_bytes(b"not an image at all")
    good = (bad / "b" / "0.png").read_bytes()
    (bad / "b" / "cut.png").write_bytes(good[: len(good) // 2])
    out = tmp_path / "p.safetensors"
    assert _train(vit_dir, bad, None, out, "vpt") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "broken.png: not an image" in err and not out.exists()
    assert _train(vit_dir, bad, None, out, "vpt", "--skip-bad-images", "--max-steps", "2") == 0
    assert "skipped 2 bad image(s)" in capsys.readouterr().err
    # a CSV list: the row's line and the missing file are named
    csv = tmp_path / "list.csv"
    csv.write_text("image,label\n" + "".join(f"train/{c}/0.png,{c}\n" for c in "abcd") + "nope/x.png,a\n")
    (tmp_path / "train").symlink_to(train)
    assert _train(vit_dir, csv, None, out, "vpt", "--max-steps", "2") == 2
    assert f"{csv}:6: nope/x.png: image file not found" in capsys.readouterr().err


def test_a_prompt_is_refused_on_another_image_model(vit_dir, data, tmp_path, capsys):
    train, val = data
    out = tmp_path / "p.safetensors"
    assert _train(vit_dir, train, None, out, "vpt", "--max-steps", "2") == 0
    other = tmp_path / "other"
    save_tiny_vision("vit", other)
    from transformers import AutoModel

    m = AutoModel.from_pretrained(str(other))
    with torch.no_grad():
        m.embeddings.patch_embeddings.projection.weight.add_(0.1)  # same architecture, other weights
    m.save_pretrained(str(other))
    capsys.readouterr()
    assert main(["eval", "--prompt", str(out), "--data", str(val), "--model", str(other), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained on another model (fingerprint" in err and str(out) in err


def test_text_and_image_methods_are_kept_apart(vit_dir, data, tmp_path, capsys):
    train, _ = data
    out = tmp_path / "p.safetensors"
    assert main(["train", "--method", "vpt", "--train", str(train), "--out", str(out)]) == 2
    assert "--method vpt is for images" in capsys.readouterr().err
    assert main(["train", "--task", "image-classify", "--method", "deep", "--train", str(train),
                 "--out", str(out)]) == 2  # fmt: skip
    assert "--method deep is for text" in capsys.readouterr().err


def test_checkpoint_validation_of_image_prompts(tmp_path):
    meta = {"method": "vpt-deep", "task": "image-classify", "fingerprint": "f", "family": "vision",
            "labels": {"labels": ["a", "b"], "words": ["a", "b"]}, "vision": {"layers": 3}}  # fmt: skip
    head = {"head.linear.weight": torch.zeros(2, 8), "head.linear.bias": torch.zeros(2)}
    p = tmp_path / "p.safetensors"
    save_prompt(p, torch.zeros(2, 8), meta, {**head, "vpt.deep": torch.zeros(2, 2, 8)})
    assert tokens_of(load_prompt(p)).shape == (3, 2, 8)
    save_prompt(p, torch.zeros(2, 8), meta, {**head, "vpt.deep": torch.zeros(1, 2, 8)})
    with pytest.raises(CheckpointError, match=r"'vpt.deep' must be \(layers-1, tokens, dim\) = \(2, 2, 8\)"):
        load_prompt(p)
    save_prompt(p, torch.zeros(2, 8), {**meta, "method": "vpt"}, {**head, "vpt.deep": torch.zeros(2, 2, 8)})
    with pytest.raises(CheckpointError, match="a vpt prompt holds no 'vpt.deep' tensor"):
        load_prompt(p)
    save_prompt(p, torch.zeros(2, 8), {**meta, "method": "vpt"})
    with pytest.raises(CheckpointError, match="needs its linear head"):
        load_prompt(p)
    save_prompt(p, torch.zeros(2, 8), {**meta, "method": "prompt"}, head)
    with pytest.raises(CheckpointError, match="must have method vpt, vpt-deep or coop"):
        load_prompt(p)


@pytest.mark.parametrize("kind", ["deit", "dinov2", "clip", "siglip"])
def test_every_tower_trains_and_evaluates(kind, data, tmp_path, capsys):
    """vpt-deep through the CLI on each other tower: the file's fingerprint is that model's, eval = the run's eval;
    a generate command on an image prompt is refused in one line."""
    train, val = data
    d = save_tiny_vision(kind, tmp_path / kind)
    out = tmp_path / "p.safetensors"
    assert _train(d, train, val, out, "vpt-deep", "--max-steps", "3") == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ck = load_prompt(out)
    assert ck.meta["vision"]["family"] == kind and ck.extra["vpt.deep"].shape == (1, 2, 32)
    assert main(["eval", "--prompt", str(out), "--data", str(val), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(res["accuracy"])
    assert main(["generate", "--prompt", str(out), "--input", "x", "--device", "cpu"]) == 2
    assert "an image prompt classifies images" in capsys.readouterr().err


class Killed(Exception):
    pass


def test_kill_and_resume_ends_with_the_uninterrupted_prompt(vit_dir, data, tmp_path, capsys, monkeypatch):
    """An image run killed after step 3 and resumed with the same flags logs the same losses and ends with the same
    prompt and head as an uninterrupted run (the one trainer's resume, on the image objective)."""
    import softprompt.trainer as trainer_mod

    train, val = data
    steps = ("--max-steps", "6", "--save-every", "1", "--eval-every", "2")
    ref = tmp_path / "ref.safetensors"
    assert _train(vit_dir, train, val, ref, "vpt-deep", *steps) == 0
    out = tmp_path / "p.safetensors"
    save_state = trainer_mod.save_state

    def killing(path, params, opt, sched, step, extra):
        save_state(path, params, opt, sched, step, extra)
        if step == 3:
            raise Killed

    with monkeypatch.context() as mp:
        mp.setattr(trainer_mod, "save_state", killing)
        with pytest.raises(Killed):
            _train(vit_dir, train, val, out, "vpt-deep", *steps)
    capsys.readouterr()
    state = str(out) + ".state"
    assert _train(vit_dir, train, val, out, "vpt-deep", *steps, "--resume", state) == 0
    assert "resumed from" in capsys.readouterr().err

    def losses(p: Path) -> list[float]:
        return [json.loads(x)["loss"] for x in p.with_suffix(".log.jsonl").read_text().splitlines()]

    assert losses(out) == losses(ref) and len(losses(out)) == 6
    a, b = load_prompt(out), load_prompt(ref)
    assert torch.equal(tokens_of(a), tokens_of(b))
    assert torch.equal(a.extra["head.linear.weight"], b.extra["head.linear.weight"])
    # the same flags with another model refuse to resume, naming the fingerprint
    other = save_tiny_vision("deit", tmp_path / "deit")
    assert _train(other, train, val, out, "vpt-deep", *steps, "--resume", state) == 2
    assert "the base model (fingerprint)" in capsys.readouterr().err
