"""softprompt.config: the dataclasses are the single source of the CLI flags and YAML keys.

Every shipped example config parses, validates and fits its data; flags override YAML; `--train.lr` is `--lr`;
every field is documented and shows in `softprompt train --help`; bad keys and values name the file or flag.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from helpers_train import ROOT

from softprompt.cli import build_config, main
from softprompt.config import (
    SECTIONS,
    ConfigError,
    DataConfig,
    RunConfig,
    apply_options,
    field_docs,
    load_yaml,
)
from softprompt.data import Verbalizer, load_samples, seen_labels
from softprompt.parsers import build_parser

CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
ALL_FIELDS = [(sec, f) for sec, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def parse_train(*argv: str) -> RunConfig:
    """What `softprompt train ARGV` would run with (defaults, then --config, then flags; validated)."""
    return build_config(build_parser().parse_args(["train", *argv]))


# ---- shipped example configs ----------------------------------------------------------------------------------


def test_example_configs_are_shipped() -> None:
    names = {p.name for p in CONFIGS}
    assert {"sst2.yaml", "rte.yaml", "agnews.yaml", "demo.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_parses_validates_and_fits_its_data(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = load_yaml(str(path))
    assert set(raw) <= set(SECTIONS), f"{path.name}: use the sections {sorted(SECTIONS)}"
    cfg = RunConfig()
    apply_options(cfg, raw, str(path))
    cfg.validate()
    monkeypatch.chdir(ROOT)  # the configs' paths are relative to the repository root, where commands run
    assert parse_train("--config", str(path)) == cfg  # the CLI reads it the same way
    d = cfg.data
    assert d.train, f"{path.name}: no training file"
    files = [f for f in (d.train, d.eval) if f]
    for f in files:
        assert f.startswith(("../shared/data/", "examples/data/")), (
            f"{path.name}: {f} is not in the shared/example data"
        )
    if cfg.train.out:
        assert not Path(cfg.train.out).is_absolute()
    missing = [f for f in files if not (ROOT / f).is_file()]
    if missing and all(f.startswith("../shared/data/") for f in missing):
        pytest.skip(f"shared benchmark data absent ({', '.join(missing)}): the data check needs ../shared/data")
    assert not missing, f"{path.name}: missing {missing}"
    # the template's fields and the verbalizer's labels fit the data: every row fills, every label is known
    verbalizer = Verbalizer.parse(d.labels, None if d.labels else seen_labels(d.train, d))
    check = d.eval or d.train  # the smaller file where there is one
    samples = load_samples(check, d, verbalizer)
    assert samples and all(s.label is not None for s in samples)
    assert set(seen_labels(check, d)) == set(verbalizer.labels), f"{path.name}: labels in --labels vs in {check}"


# ---- flags, YAML and precedence -------------------------------------------------------------------------------


def test_flags_override_yaml(tmp_path: Path) -> None:
    yml = tmp_path / "run.yaml"
    yml.write_text("prompt:\n  num_tokens: 7\ntrain:\n  lr: 0.5\n  plot: true\ndata:\n  template: 'Q: {q}'\n")
    cfg = parse_train("--config", str(yml), "--lr", "0.2", "--no-plot")
    assert cfg.train.lr == 0.2 and cfg.train.plot is False  # the flags win
    assert cfg.prompt.num_tokens == 7 and cfg.data.template == "Q: {q}"  # the file beats the defaults
    assert cfg.train.batch_size == RunConfig().train.batch_size  # untouched: the default
    assert parse_train("--config", str(yml)).train.lr == 0.5


def test_dotted_flag_is_the_short_flag() -> None:
    assert parse_train("--train.lr", "0.5") == parse_train("--lr", "0.5")
    assert parse_train("--train.lr", "0.5").train.lr == 0.5
    assert parse_train("--prompt.num_tokens", "9", "--data.no_truncate") == parse_train(
        "--num-tokens", "9", "--no-truncate"
    )


@pytest.mark.parametrize("sec,f", ALL_FIELDS, ids=[f"{s}.{f.name}" for s, f in ALL_FIELDS])
def test_every_field_has_both_flag_forms(sec: str, f: dataclasses.Field) -> None:
    p = build_parser()
    short, dotted = f"--{f.name.replace('_', '-')}", f"--{sec}.{f.name}"
    if f.type in ("bool", bool):
        assert getattr(p.parse_args(["train", short]), f.name) is True
        assert getattr(p.parse_args(["train", dotted]), f.name) is True
        assert getattr(p.parse_args(["train", f"--no-{sec}.{f.name}"]), f.name) is False
    else:
        assert getattr(p.parse_args(["train", short, "7"]), f.name) == "7"
        assert getattr(p.parse_args(["train", dotted, "7"]), f.name) == "7"
    assert getattr(p.parse_args(["train"]), f.name) is None  # unset flags leave YAML values alone


def test_no_truncate_flag_switches_truncation_off_and_on() -> None:
    # regression: with argparse.BooleanOptionalAction, "--no-truncate" (starts with --no-) set the field to False
    assert parse_train("--no-truncate").data.no_truncate is True
    assert parse_train("--data.no_truncate").data.no_truncate is True
    assert parse_train("--no-truncate", "--truncate").data.no_truncate is False
    assert parse_train("--no-progress").train.progress is False and parse_train().train.progress is True


def test_nested_flat_and_dotted_yaml_keys_are_equivalent() -> None:
    forms = [{"train": {"lr": 0.5}}, {"lr": 0.5}, {"train.lr": 0.5}, {"train": {"lr": "0.5"}}]
    cfgs = []
    for opts in forms:
        cfg = RunConfig()
        apply_options(cfg, opts, "x.yaml")
        cfgs.append(cfg)
    assert all(c == cfgs[0] for c in cfgs) and cfgs[0].train.lr == 0.5


def test_section_names_that_are_also_field_names() -> None:
    """`train` is a section and the data field --train; `model` a section and the field --model."""
    cfg = RunConfig()
    apply_options(cfg, {"train": "data.jsonl", "model": "minilm-l6"}, "x.yaml")
    assert cfg.data.train == "data.jsonl" and cfg.model.model == "minilm-l6"
    apply_options(cfg, {"train": {"lr": 0.3}, "model": {"dtype": "bfloat16"}}, "x.yaml")
    assert cfg.train.lr == 0.3 and cfg.model.dtype == "bfloat16" and cfg.data.train == "data.jsonl"


def test_field_names_are_unique_across_sections() -> None:
    names = [f.name for _, f in ALL_FIELDS]
    assert len(names) == len(set(names))


# ---- documentation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sec", list(SECTIONS))
def test_every_field_has_a_docstring(sec: str) -> None:
    cls = SECTIONS[sec]
    docs = field_docs(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    assert sorted(docs) == sorted(names), f"{cls.__name__}: undocumented {set(names) - set(docs)}"
    assert all(len(docs[n]) >= 10 for n in names)


def test_train_help_lists_every_field_with_its_doc(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    squashed = "".join(text.split())  # argparse re-wraps the help: compare without whitespace
    for sec, f in ALL_FIELDS:
        assert f"--{f.name.replace('_', '-')}" in text and f"--{sec}.{f.name}" in text, f.name
        doc = field_docs(SECTIONS[sec])[f.name]
        assert "".join(doc.split()) in squashed, f"{sec}.{f.name}: docstring missing from --help"
        assert f"(default:{getattr(SECTIONS[sec](), f.name)})".replace(" ", "") in squashed
    assert squashed.count("(default:") == len(ALL_FIELDS)  # once per field: no extra argparse "(default: None)"


# ---- bad values -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,needle",
    [
        ({"num_tokens": 0}, "--num-tokens must be >= 1"),
        ({"lr": -1}, "--lr must be > 0"),
        ({"lr": float("nan")}, "--lr must be > 0"),
        ({"optimizer": "sgd"}, "--optimizer must be adamw or adafactor, got 'sgd'"),
        ({"schedule": "step"}, "--schedule"),
        ({"task": "qa"}, "--task"),
        ({"head": "mlp"}, "--head"),
        ({"metric": "bleu"}, "--metric"),
        ({"position": "end"}, "--position"),
        ({"precision": "fp8"}, "--precision"),
        ({"batch_size": 0}, "--batch-size"),
        ({"max_steps": 0, "epochs": 0}, "one of --max-steps or --epochs"),
        ({"save_every": 0}, "--save-every must be >= 1"),
        ({"patience": -1}, "--patience"),
        ({"eval_max": -1}, "--eval-max"),
        ({"max_target_length": 0}, "--max-target-length"),
        ({"max_length": 0}, "--max-length"),
    ],
)
def test_validate_names_the_flag(options: dict, needle: str) -> None:
    cfg = RunConfig()
    apply_options(cfg, options, "test")
    with pytest.raises(ConfigError, match="^" + needle.replace("(", r"\(")):
        cfg.validate()


@pytest.mark.parametrize(
    "options,needles",
    [
        ({"train": {"lrr": 0.1}}, ["run.yaml", "train.lrr"]),
        ({"lrr": 0.1}, ["run.yaml", "lrr"]),
        ({"train.lrr": 0.1}, ["run.yaml", "train.lrr"]),
        ({"nosection.lr": 0.1}, ["run.yaml", "nosection.lr"]),
        ({"max_steps": "ten"}, ["run.yaml", "max_steps", "int", "'ten'"]),
        ({"max_steps": 1.5}, ["run.yaml", "max_steps", "1.5"]),  # never silently 1
        ({"lr": True}, ["run.yaml", "lr"]),  # YAML `lr: yes`
        ({"plot": "maybe"}, ["run.yaml", "plot", "'maybe'"]),
        ({"labels": ["a", "b"]}, ["run.yaml", "labels"]),  # a list where a string belongs
    ],
)
def test_bad_yaml_options_name_file_and_key(options: dict, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        apply_options(RunConfig(), options, "run.yaml")
    for n in needles:
        assert n in str(e.value)


def test_yaml_values_are_coerced() -> None:
    cfg = RunConfig()
    apply_options(cfg, {"max_steps": 40.0, "lr": 1, "plot": "yes", "progress": "false", "train": 12}, "x.yaml")
    assert (cfg.train.max_steps, cfg.train.lr, cfg.train.plot, cfg.train.progress) == (40, 1.0, True, False)
    assert cfg.data.train == "12" and isinstance(cfg.train.lr, float)


def test_load_yaml_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "list.yaml").write_text("- lr: 0.1\n")
    (tmp_path / "broken.yaml").write_text("train:\n  lr: [0.1\n")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="list.yaml: a config file must be a mapping"):
        load_yaml(str(tmp_path / "list.yaml"))
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: invalid YAML"):
        load_yaml(str(tmp_path / "broken.yaml"))
    with pytest.raises(ConfigError, match="--config: file not found"):
        load_yaml(str(tmp_path / "nope.yaml"))
    assert load_yaml(str(tmp_path / "empty.yaml")) == {}


def test_defaults_validate_once_data_is_given() -> None:
    cfg = RunConfig()
    cfg.validate()  # the defaults themselves are in range
    assert isinstance(cfg.data, DataConfig) and cfg.train.save_every >= 1
