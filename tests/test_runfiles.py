"""softprompt.runfiles: `train` and `train-multi` never destroy a user's file. Each probe is a command that used to
overwrite or delete a file (or train fully and then fail): now it is one line `softprompt: error: ...`, exit 2,
before the model loads, with every file as it was. Also: an overwritten prompt keeps its permission mode, and a
`--resume` of a missing or corrupt state is a one-line error naming it.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from helpers_train import (
    LABELS,
    TEMPLATE,
    assert_cli_error,
    cls_records,
    fast_env,
    multi_config,
    run,
    train_argv,
    write_config,
    write_jsonl,
    write_multi_data,
)

from softprompt.checkpoint import load_prompt

train_mod = importlib.import_module("softprompt.train")  # the attribute softprompt.train is the function
multi_mod = importlib.import_module("softprompt.multitask")


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with fast_env(monkeypatch):
        yield


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusals come before any work: loading the model fails the test (an AssertionError is no CLI error)."""

    def refuse(*a, **kw):
        raise AssertionError("the model was loaded: the check must come before any work")

    monkeypatch.setattr(train_mod, "load_backbone", refuse)
    monkeypatch.setattr(multi_mod, "load_backbone", refuse)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder and its bytes (directories by name): what must be unchanged after a refusal."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in folder.rglob("*")}


def _prompt_file(path: Path) -> Path:
    import torch

    from softprompt.checkpoint import save_prompt

    save_prompt(path, torch.zeros(4, 32), {"task": "classify"})
    return path


# ---- train: an output that is an input -------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--train", "--eval", "--init", "--config"])
def test_out_that_is_an_input_is_refused(
    flag: str, tiny_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model: None
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", cls_records())
    extra: list[str] = []
    if flag == "--train":
        out = data
    elif flag == "--eval":
        out = write_jsonl(tmp_path / "dev.jsonl", cls_records(6))
        extra = ["--eval", str(out)]
    elif flag == "--init":
        out = _prompt_file(tmp_path / "source.safetensors")  # a softprompt prompt, but this run's input
        extra = ["--init", f"file:{out}"]
    else:
        out = tmp_path / "run.yaml"
        out.write_text(yaml.safe_dump({"labels": LABELS, "template": TEMPLATE}))
        extra = ["--config", str(out)]
    before = snapshot(tmp_path)
    rc, stdout, err = run(capsys, [*train_argv(tiny_dir("llama"), data, out, *extra), "--overwrite"])
    assert_cli_error(rc, stdout, err, f"--out {out}", f"this run's {flag}", "choose another --out")
    assert snapshot(tmp_path) == before  # not even a log or state directory


def test_metrics_log_that_is_an_input_is_refused(
    tiny_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model: None
) -> None:
    """--out run.safetensors logs to run.log.jsonl: the log used to be deleted at the start of the run."""
    data = write_jsonl(tmp_path / "run.log.jsonl", cls_records())
    before = snapshot(tmp_path)
    rc, stdout, err = run(capsys, train_argv(tiny_dir("llama"), data, tmp_path / "run.safetensors"))
    assert_cli_error(rc, stdout, err, f"the metrics log (from {tmp_path / 'run.safetensors'})", str(data), "--train")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("what", ["prompt", "log", "plot", "state"])
def test_foreign_file_at_an_output_path_is_refused(
    what: str, tiny_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model: None
) -> None:
    """An existing file that is not what the run writes there: --out notes.txt, a data file named like the log,
    a user's file where the --plot image or the state goes."""
    data = write_jsonl(tmp_path / "data.jsonl", cls_records())
    out = tmp_path / ("notes.txt" if what == "prompt" else "p.safetensors")
    target = {"prompt": out, "log": tmp_path / "p.log.jsonl", "plot": tmp_path / "p.png",
              "state": tmp_path / "p.safetensors.state" / "state.json"}[what]  # fmt: skip
    target.parent.mkdir(exist_ok=True)
    target.write_text('{"text": "my own notes", "label": "a"}\n')
    before = snapshot(tmp_path)
    rc, stdout, err = run(capsys, train_argv(tiny_dir("llama"), data, out, "--plot"))
    assert_cli_error(rc, stdout, err, str(target), "exists and is not", "--overwrite")
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_a_foreign_out_file(
    tiny_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", cls_records())
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    rc, _, err = run(capsys, train_argv(tiny_dir("llama"), data, notes, "--max-steps", "1", "--overwrite"))
    assert rc == 0, err
    assert load_prompt(notes).prompt.shape == (4, 32)


def test_out_directory_is_refused_at_once(
    tiny_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model: None
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", cls_records())
    (tmp_path / "runs").mkdir()
    before = snapshot(tmp_path)
    rc, stdout, err = run(capsys, train_argv(tiny_dir("llama"), data, tmp_path / "runs"))
    assert_cli_error(rc, stdout, err, f"--out {tmp_path / 'runs'} is a directory")
    assert snapshot(tmp_path) == before  # no runs.log.jsonl, no runs.state/


def test_state_path_that_is_a_file_is_refused(
    tiny_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model: None
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", cls_records())
    (tmp_path / "p.safetensors.state").write_text("not a directory")
    before = snapshot(tmp_path)
    rc, stdout, err = run(capsys, train_argv(tiny_dir("llama"), data, tmp_path / "p.safetensors", "--overwrite"))
    assert_cli_error(rc, stdout, err, "the training state", "is a file, not a directory")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("with_eval", [False, True])  # the prompt written at the end, or the best one
def test_overwritten_prompt_keeps_its_mode(
    with_eval: bool, tiny_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", cls_records())
    out = tmp_path / "p.safetensors"
    argv = train_argv(tiny_dir("llama"), data, out, "--max-steps", "1", *(["--eval", str(data)] if with_eval else []))
    assert run(capsys, argv)[0] == 0
    out.chmod(0o644)
    first = out.read_bytes()
    rc, _, err = run(capsys, [*argv, "--seed", "1"])
    assert rc == 0, err
    assert out.read_bytes() != first  # really rewritten
    assert out.stat().st_mode & 0o777 == 0o644


# ---- train: --resume -----------------------------------------------------------------------------------------------
def test_resume_of_a_missing_directory_is_refused(
    tiny_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model: None
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", cls_records())
    before = snapshot(tmp_path)
    missing = tmp_path / "p.state"
    rc, stdout, err = run(capsys, [*train_argv(tiny_dir("llama"), data, tmp_path / "p.safetensors"), "--resume", str(missing)])  # fmt: skip
    assert_cli_error(rc, stdout, err, f"--resume {missing}: no such directory")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_resume_of_a_corrupt_state_is_one_line_error(
    damage: str, tiny_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", cls_records())
    out = tmp_path / "p.safetensors"
    argv = train_argv(tiny_dir("llama"), data, out, "--max-steps", "4", "--save-every", "1")
    state = Path(str(out) + ".state") / "state.safetensors"
    rc, _, err = run(capsys, argv)
    assert rc == 0, err
    raw = state.read_bytes()
    state.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"\x00garbage" * 64)
    prompt = out.read_bytes()
    rc, stdout, err = run(capsys, [*argv, "--resume", str(state.parent)])
    assert_cli_error(rc, stdout, err, str(state), "not a readable training state")
    assert out.read_bytes() == prompt


# ---- train-multi: the same checks on its output directory ----------------------------------------------------------
@pytest.mark.parametrize("probe", ["data_is_the_log", "out_is_a_file", "foreign_export", "config_is_an_export",
                                   "missing_resume"])  # fmt: skip
def test_train_multi_refuses_to_destroy_files(
    probe: str, tiny_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model: None
) -> None:
    data = write_multi_data(tmp_path)
    out = tmp_path / "o"
    cfg = multi_config(tiny_dir("llama"), data, out)
    conf = tmp_path / "m.yaml"
    argv = ["train-multi", "--config", str(conf)]
    if probe == "data_is_the_log":  # a task's data where the run's log goes
        out.mkdir()
        cfg["tasks"][0]["train"] = str(write_jsonl(out / "train.log.jsonl", [{"text": "x", "label": "pos"}] * 4))
        needles = [str(out / "train.log.jsonl"), "task sent train"]
    elif probe == "out_is_a_file":
        out.write_text("my notes\n")
        needles = [f"--out {out} is a file"]
    elif probe == "foreign_export":
        out.mkdir()
        (out / "topic.safetensors").write_text("my notes\n")
        needles = ["task topic's prompt", "exists and is not a softprompt prompt", "--overwrite"]
    elif probe == "config_is_an_export":
        out.mkdir()
        conf = out / "sent.safetensors"
        argv = ["train-multi", "--config", str(conf)]
        needles = ["task sent's prompt", "this run's --config"]
    else:
        argv += ["--resume", str(tmp_path / "nope")]  # used to start silently from step 0
        needles = [f"--resume {tmp_path / 'nope'}: no such directory"]
    write_config(conf, cfg)
    before = snapshot(tmp_path)
    rc, stdout, err = run(capsys, argv)
    assert_cli_error(rc, stdout, err, *needles)
    assert snapshot(tmp_path) == before


def test_train_multi_resume_of_a_corrupt_state_is_one_line_error(
    tiny_dir: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_multi_data(tmp_path)
    out = tmp_path / "o"
    conf = write_config(tmp_path / "m.yaml", multi_config(tiny_dir("llama"), data, out, max_steps=1))
    assert run(capsys, ["train-multi", "--config", str(conf)])[0] == 0
    state = out / "state" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    rc, stdout, err = run(capsys, ["train-multi", "--config", str(conf), "--resume", str(state.parent)])
    assert_cli_error(rc, stdout, err, str(state), "not a readable training state")
    assert json.loads((out / "state" / "state.json").read_text())["step"] == 1
