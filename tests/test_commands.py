"""One command table: every command's flags are the fields of its config dataclasses (softprompt.config) and no
more, each documented; defaults come from the fields; validation messages name real flags; softprompt.cli runs
each command through its COMMANDS entry."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re

import pytest

from softprompt import cli, commands, config, parsers
from softprompt.commands import ServeConfig, TrainMultiConfig
from softprompt.config import RunConfig, field_docs

NAMES = list(parsers.COMMANDS)


def _sub(name: str) -> argparse.ArgumentParser:
    p = parsers.build_parser()
    choices = p._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    return choices[name]


def _actions(name: str) -> list[argparse.Action]:
    return [a for a in _sub(name)._actions if a.dest != "help"]


def _option_strings(name: str) -> set[str]:
    return {s for a in _actions(name) for s in a.option_strings}


def test_the_command_tables_agree() -> None:
    p = parsers.build_parser()
    choices = p._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert list(choices) == NAMES == list(cli.COMMANDS)
    assert all(callable(h) for h in cli.COMMANDS.values())


@pytest.mark.parametrize("name", NAMES)
def test_every_field_is_a_flag_and_every_flag_a_field(name: str) -> None:
    fields = [f.name for cls in parsers.command_dataclasses(name) for f in dataclasses.fields(cls)]
    assert len(fields) == len(set(fields)), "a field name used twice"
    assert sorted({a.dest for a in _actions(name)}) == sorted(fields)


@pytest.mark.parametrize("name", NAMES)
def test_every_field_is_documented_and_its_doc_is_the_help(name: str) -> None:
    for cls in parsers.command_dataclasses(name):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert len(docs.get(f.name, "")) >= 10, f"{cls.__name__}.{f.name}: no docstring"
    if name == "train":
        return  # tests/test_config.py checks train's sections
    cls = parsers.COMMANDS[name].config
    docs = field_docs(cls)
    helps = {a.dest: " ".join((a.help or "").split()) for a in _actions(name)}
    for f in dataclasses.fields(cls):
        assert helps[f.name].startswith(" ".join(docs[f.name].replace("%", "%%").split())), f.name


@pytest.mark.parametrize("name", [n for n in NAMES if n != "train"])
def test_flag_defaults_are_the_field_defaults(name: str) -> None:
    cls = parsers.COMMANDS[name].config
    by_dest = {a.dest: a for a in _actions(name)}
    for f in dataclasses.fields(cls):
        a = by_dest[f.name]
        if a.required or not a.option_strings or f.default is dataclasses.MISSING:
            assert a.default is None, f.name
            continue
        assert a.default == f.default and type(a.default) is type(f.default), f.name
        choices = f.metadata.get("choices")
        assert a.choices == choices, f.name


def test_serve_config_from_the_parsed_flags() -> None:
    args = parsers.build_parser().parse_args(["serve", "--prompts", "d", "--max-inputs", "7", "--port", "9"])
    cfg = commands.from_args(ServeConfig, args)
    assert cfg == ServeConfig(prompts="d", max_inputs=7, port=9)
    assert vars(args).keys() - {"cmd"} == {f.name for f in dataclasses.fields(ServeConfig)}


def test_serve_config_is_one_class() -> None:
    from softprompt.serve import ServeConfig as A
    from softprompt.serve.scheduler import MODES
    from softprompt.serve.server import ServeConfig as B

    assert A is B is ServeConfig
    assert tuple(MODES) == commands.SCHEDULER_MODES


def _named_flags(fn) -> set[str]:
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", inspect.getsource(fn)))


@pytest.mark.parametrize(
    "name,fn",
    [("serve", ServeConfig.validate), ("train", RunConfig.validate)],
    ids=["serve", "train"],
)
def test_validation_names_only_real_flags(name: str, fn) -> None:
    named = _named_flags(fn)
    assert named and named <= _option_strings(name), named - _option_strings(name)


def test_multi_config_validation_names_only_train_multi_flags() -> None:
    from softprompt.multitask import MultiConfig

    named = _named_flags(MultiConfig.validate)
    assert named and named <= _option_strings("train-multi")


@pytest.mark.parametrize("field,bad", [("max_inputs", 0), ("max_batch_size", 0), ("port", 70000), ("threads", 0)])
def test_serve_errors_name_a_flag_that_parses(tmp_path, field: str, bad: int) -> None:
    with pytest.raises(config.ConfigError) as e:
        ServeConfig(prompts=str(tmp_path), **{field: bad}).validate()
    flag = str(e.value).split()[0]
    assert flag == "--" + field.replace("_", "-")
    args = parsers.build_parser().parse_args(["serve", "--prompts", str(tmp_path), flag, str(bad)])
    with pytest.raises(config.ConfigError):
        commands.from_args(ServeConfig, args).validate()


def test_train_multi_overrides_are_run_config_fields() -> None:
    run_fields = {f.name for cls in config.SECTIONS.values() for f in dataclasses.fields(cls)}
    own = {f.name for f in dataclasses.fields(TrainMultiConfig)} - {"config", "shared_tokens"}
    assert own <= run_fields


def test_train_multi_overwrite_flag_reaches_the_run(tmp_path) -> None:
    from softprompt.multitask import parse_multi_config

    p = parsers.build_parser()
    raw = {"tasks": [{"name": "a", "train": str(tmp_path / "a.jsonl")}]}

    def over(*argv: str) -> dict:
        args = p.parse_args(["train-multi", "--config", "m.yaml", *argv])
        return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainMultiConfig) if f.name != "config"}

    assert over()["overwrite"] is None and over("--overwrite")["overwrite"] is True
    assert over("--no-overwrite")["overwrite"] is False
    assert parse_multi_config(raw, "m.yaml", over("--overwrite")).run.train.overwrite is True
    assert parse_multi_config(raw, "m.yaml", over()).run.train.overwrite is False
    assert parse_multi_config(dict(raw, overwrite=True), "m.yaml", over()).run.train.overwrite is True  # YAML kept
    assert parse_multi_config(dict(raw, overwrite=True), "m.yaml", over("--no-overwrite")).run.train.overwrite is False


def test_main_runs_the_commands_table_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setitem(cli.COMMANDS, "info", lambda args: seen.append(args.path) or 7)
    assert cli.main(["info", "x.safetensors"]) == 7 and seen == ["x.safetensors"]


def test_build_config_lives_with_the_configs() -> None:
    assert cli.build_config is config.build_config
    args = parsers.build_parser().parse_args(["train", "--lr", "0.5"])
    assert config.build_config(args).train.lr == 0.5
