"""Tests for softprompt.data: reading files, templates, verbalizers, encoding, batching, padding."""

from __future__ import annotations

import io
import json
import random
import sys
import time
from pathlib import Path

import pytest
import torch

from softprompt.config import DataConfig
from softprompt.data import (
    DataError,
    Encoded,
    Sample,
    Template,
    Verbalizer,
    encode_samples,
    length_grouped_batches,
    load_samples,
    pad_left,
    pad_right,
    read_records,
    seen_labels,
    sort_labels,
    sorted_batches,
    split_holdout,
)

SHARED = Path(__file__).parents[1].parent / "shared" / "data"


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def one_line(e: pytest.ExceptionInfo[DataError]) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def jsonl(tmp_path: Path, name: str, rows: list[dict]) -> str:
    return write(tmp_path, name, "".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------- reading


def test_jsonl_blank_lines_and_line_numbers(tmp_path: Path) -> None:
    p = write(tmp_path, "a.jsonl", '{"text": "x", "label": 1}\n\n{"text": "y", "label": 0}\n')
    assert read_records(p) == [(1, {"text": "x", "label": "1"}), (3, {"text": "y", "label": "0"})]


def test_json_lines_extension_and_crlf(tmp_path: Path) -> None:
    p = write(tmp_path, "a.json-lines", '{"text": "x"}\r\n{"text": "y"}\r\n')
    assert [r["text"] for _, r in read_records(p)] == ["x", "y"]


def test_malformed_json_line_names_line(tmp_path: Path) -> None:
    p = write(tmp_path, "bad.jsonl", '{"text": "a"}\n{"text": "b"}\n\n{"text": "c",}\n')
    with pytest.raises(DataError) as e:
        read_records(p)
    msg = one_line(e)
    assert msg.startswith(f"{p}:4: malformed JSON"), msg


def test_jsonl_non_object_line(tmp_path: Path) -> None:
    p = write(tmp_path, "bad.jsonl", '{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a JSON object"):
        read_records(p)


def test_json_booleans_numbers_and_nulls(tmp_path: Path) -> None:
    p = jsonl(tmp_path, "b.jsonl", [{"q": "is it", "label": True, "idx": 3, "score": 1.0, "x": None, "y": False}])
    [(_, rec)] = read_records(p)
    assert rec == {"q": "is it", "label": "true", "idx": "3", "score": "1", "y": "false"}


def test_json_list_keeps_line_numbers(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    p = write(tmp_path, "l.json", json.dumps(rows, indent=2))
    got = read_records(p)
    assert [r for _, r in got] == rows
    lines = Path(p).read_text().split("\n")
    assert [lines[n - 1].strip() for n, _ in got] == ["{", "{"]
    assert got[0][0] == 2


def test_json_list_errors(tmp_path: Path) -> None:
    p = write(tmp_path, "l.json", '[\n  {"text": "a"},\n  {"text": "b"\n  }x\n]')
    with pytest.raises(DataError, match=r"l\.json:4: malformed JSON"):
        read_records(p)
    p = write(tmp_path, "m.json", '[\n  {"text": "a"},\n  5\n]')
    with pytest.raises(DataError, match=r"m\.json:3: expected a JSON object"):
        read_records(p)


def test_json_file_holding_json_lines(tmp_path: Path) -> None:
    p = write(tmp_path, "x.json", '{"text": "a"}\n{"text": "b"}\n')
    assert [n for n, _ in read_records(p)] == [1, 2]


def test_empty_and_missing_files(tmp_path: Path) -> None:
    for name, text in [("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.csv", "text,label\n"), ("e.tsv", "")]:
        p = write(tmp_path, name, text)
        with pytest.raises(DataError) as e:
            read_records(p)
        assert one_line(e) == f"{p}: no records"
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        read_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"unknown file type '\.xml'"):
        read_records(write(tmp_path, "a.xml", "<a/>"))


def test_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not UTF-8"):
        read_records(str(p))


def test_csv_quoting_bom_and_multiline_cell(tmp_path: Path) -> None:
    text = '\ufefftext,label\n"hello, world",pos\n"two\nlines",neg\nplain,neg\n'
    p = write(tmp_path, "q.csv", text)
    got = read_records(p)
    assert got == [
        (2, {"text": "hello, world", "label": "pos"}),
        (3, {"text": "two\nlines", "label": "neg"}),
        (5, {"text": "plain", "label": "neg"}),
    ]


def test_csv_wrong_cell_count(tmp_path: Path) -> None:
    p = write(tmp_path, "w.csv", "text,label\na,1\nb,1,extra\n")
    with pytest.raises(DataError) as e:
        read_records(p)
    msg = one_line(e)
    assert msg.startswith(f"{p}:3: row has 3 cells") and "header row" in msg, msg


def test_tsv_keeps_quotes(tmp_path: Path) -> None:
    # GLUE TSVs hold bare quote characters: they must not start a quoted cell.
    p = write(tmp_path, "g.tsv", 'sentence\tlabel\n"a film\t1\nit \'s "great" \t0\n')
    assert [r for _, r in read_records(p)] == [
        {"sentence": '"a film', "label": "1"},
        {"sentence": 'it \'s "great" ', "label": "0"},
    ]


def test_headerless_tsv_with_columns(tmp_path: Path) -> None:
    p = write(tmp_path, "h.tsv", "first text\tWorld\nsecond text\tSports\n")
    got = read_records(p, ["text", "label"])
    assert got == [(1, {"text": "first text", "label": "World"}), (2, {"text": "second text", "label": "Sports"})]
    with pytest.raises(DataError, match=r"h\.tsv:1: row has 2 cells, --columns names 3"):
        read_records(p, ["a", "b", "c"])


def test_headerless_file_without_columns_hints(tmp_path: Path) -> None:
    p = write(tmp_path, "h.tsv", "first text\tWorld\nsecond text\tSports\n")
    with pytest.raises(DataError) as e:
        load_samples(p, DataConfig(), None)
    msg = one_line(e)
    assert f"{p}:2: missing field" in msg and "--columns" in msg, msg


def test_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"text": "a"}\n'))
    assert read_records("-") == [(1, {"text": "a"})]
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(DataError, match="<stdin>: no records"):
        read_records("-")


def test_hf_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match=r"hf:glue:train: .*pip install datasets"):
        read_records("hf:glue:train")


# ---------------------------------------------------------------- templates


def test_template_fields_escapes_and_braces() -> None:
    t = Template("P: {premise}\\nH: {hypothesis}\\t{{x}} {premise}")
    assert t.fields == ["premise", "hypothesis"]
    assert t.fill({"premise": "a", "hypothesis": "b"}, "f:1") == "P: a\nH: b\t{x} a"
    assert Template("{a}\\\\n").fill({"a": "z"}, "f:1") == "z\\n"  # an escaped backslash stays literal


def test_template_without_placeholder() -> None:
    with pytest.raises(DataError) as e:
        Template("Sentiment:")
    assert one_line(e).startswith("--template: ") and "placeholder" in str(e.value)
    with pytest.raises(DataError, match="^--eval-template: "):
        Template("{{literal}}", flag="--eval-template")
    for bad in ["{}", "{a!r}", "{a:>5}", "{a"]:
        with pytest.raises(DataError, match="^--template: "):
            Template(bad)


def test_template_missing_field_message() -> None:
    with pytest.raises(DataError) as e:
        Template("{premise} {hypothesis}").fill({"premise": "a"}, "train.jsonl:17")
    assert one_line(e).startswith("train.jsonl:17: missing field 'hypothesis' (needed by --template)")


def test_load_samples_missing_template_field(tmp_path: Path) -> None:
    p = jsonl(tmp_path, "t.jsonl", [{"premise": "a", "label": "x"}, {"label": "y"}])
    with pytest.raises(DataError) as e:
        load_samples(p, DataConfig(template="{premise}"), None)
    assert one_line(e).startswith(f"{p}:2: missing field 'premise' (needed by --template)")


def test_template_using_label_is_rejected(tmp_path: Path) -> None:
    p = jsonl(tmp_path, "t.jsonl", [{"text": "a", "label": "x"}])
    with pytest.raises(DataError, match="^--template: uses {label}"):
        load_samples(p, DataConfig(template="{text} {label}"), None)


# ---------------------------------------------------------------- verbalizer


def test_verbalizer_parse_order_and_spaces() -> None:
    v = Verbalizer.parse(" 1=very good , 0 = very bad,2=so\\, so")
    assert v.labels == ["1", "0", "2"] and v.words == ["very good", "very bad", "so, so"]
    assert v.index("0", "f:1") == 1
    assert Verbalizer.from_meta(json.loads(json.dumps(v.to_meta()))) == v


def test_verbalizer_default_from_seen() -> None:
    v = Verbalizer.parse(None, ["neg", "pos"])
    assert v.labels == v.words == ["neg", "pos"]
    with pytest.raises(DataError, match="^--labels: "):
        Verbalizer.parse(None, [])


@pytest.mark.parametrize("spec", ["yes,no", "a=yes,=no", "a=yes,b=", "a=yes,,b=no"])
def test_verbalizer_bad_syntax(spec: str) -> None:
    with pytest.raises(DataError) as e:
        Verbalizer.parse(spec)
    assert one_line(e).startswith("--labels: expected label=word")


def test_verbalizer_duplicates() -> None:
    with pytest.raises(DataError, match="^--labels: label 'a' is given twice"):
        Verbalizer.parse("a=yes,b=no,a=maybe")
    with pytest.raises(DataError, match="^--labels: labels 'a' and 'b' share the word 'yes'"):
        Verbalizer.parse("a=yes,b=yes")


def test_unknown_label(tmp_path: Path) -> None:
    p = jsonl(tmp_path, "u.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}])
    with pytest.raises(DataError) as e:
        load_samples(p, DataConfig(), Verbalizer.parse("pos=great,neg=terrible"))
    assert one_line(e) == f"{p}:2: label 'meh' is not in the verbalizer (--labels knows: pos, neg)"


def test_from_meta_rejects_garbage() -> None:
    with pytest.raises(DataError):
        Verbalizer.from_meta({"labels": ["a"], "words": []})


# ---------------------------------------------------------------- samples


def test_load_samples_classify(tmp_path: Path) -> None:
    p = write(tmp_path, "s.tsv", "sentence\tlabel\ngood film \t1\nbad film \t0\n")
    cfg = DataConfig(template="Review: {sentence}\\nSentiment:", labels="0=negative,1=positive")
    s = load_samples(p, cfg, Verbalizer.parse(cfg.labels))
    assert [x.label for x in s] == [1, 0]
    assert s[0].text == "Review: good film \nSentiment:" and s[0].where == f"{p}:2"
    assert s[0].record == {"sentence": "good film ", "label": "1"}


def test_load_samples_default_verbalizer_and_seen_labels(tmp_path: Path) -> None:
    rows = [{"text": str(i), "label": lab} for i, lab in enumerate(["10", "2", "1", "2"])]
    p = jsonl(tmp_path, "n.jsonl", rows)
    assert seen_labels(p, DataConfig()) == ["1", "2", "10"]  # integer labels sort numerically
    assert [x.label for x in load_samples(p, DataConfig(), None)] == [2, 1, 0, 1]
    assert sort_labels(["b", "a", "b"]) == ["a", "b"]


def test_missing_label_field(tmp_path: Path) -> None:
    p = jsonl(tmp_path, "m.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}, {"text": "c"}])
    cfg = DataConfig(label_field="label")
    for call in (lambda: load_samples(p, cfg, Verbalizer.parse("x=yes")), lambda: seen_labels(p, cfg)):
        with pytest.raises(DataError) as e:
            call()
        assert one_line(e).startswith(f"{p}:3: missing field 'label' (--label-field)")
    # prediction: records without labels are fine
    s = load_samples(p, cfg, Verbalizer.parse("x=yes"), require_targets=False)
    assert [x.label for x in s] == [0, 0, None]


def test_generate_targets(tmp_path: Path) -> None:
    p = jsonl(tmp_path, "g.jsonl", [{"q": "2+2", "a": "4"}, {"q": "3+3"}])
    cfg = DataConfig(task="generate", template="Q: {q} A:", target_field="a")
    with pytest.raises(DataError) as e:
        load_samples(p, cfg, None)
    assert one_line(e).startswith(f"{p}:2: missing field 'a' (--target-field)")
    s = load_samples(p, cfg, None, require_targets=False)
    assert [(x.text, x.target, x.label) for x in s] == [("Q: 2+2 A:", "4", None), ("Q: 3+3 A:", None, None)]


def test_columns_flag(tmp_path: Path) -> None:
    p = write(tmp_path, "c.csv", "hello,World\nbye,Sports\n")
    s = load_samples(p, DataConfig(columns="text, label"), None)
    assert [(x.text, x.label) for x in s] == [("hello", 1), ("bye", 0)]
    with pytest.raises(DataError, match="^--columns: "):
        load_samples(p, DataConfig(columns="text,text"), None)


# ---------------------------------------------------------------- encoding


def fake_encode(text: str) -> list[int]:
    return [int(t) for t in text.split()]


def test_truncation_keeps_last_tokens_and_counts() -> None:
    samples = [Sample("1 2 3 4 5 6", label=0, where="f:1"), Sample("7 8", label=1, where="f:2")]
    enc, n = encode_samples(samples, fake_encode, max_length=4, truncate=True)
    assert n == 1
    assert enc[0] == Encoded([3, 4, 5, 6], 0, None, True)
    assert enc[1] == Encoded([7, 8], 1, None, False)
    enc, _ = encode_samples(samples, fake_encode, max_length=4, truncate=True, keep_first=1)
    assert enc[0].input_ids == [1, 4, 5, 6]  # e.g. a BOS token survives


def test_overlong_without_truncation() -> None:
    samples = [Sample("1 2", where="a.jsonl:1"), Sample("1 2 3 4 5", where="a.jsonl:2")]
    with pytest.raises(DataError) as e:
        encode_samples(samples, fake_encode, max_length=3, truncate=False)
    assert one_line(e) == "a.jsonl:2: input has 5 tokens, more than --max-length 3 (drop --no-truncate to truncate)"


def test_empty_input_and_targets() -> None:
    with pytest.raises(DataError, match="^f:9: input is empty"):
        encode_samples([Sample("", where="f:9")], fake_encode, max_length=3, truncate=True)
    s = [Sample("1", target="5 6 7 8", where="f:1")]
    enc, _ = encode_samples(s, fake_encode, max_length=3, truncate=True, max_target_length=2)
    assert enc[0].target_ids == [5, 6]  # targets keep their start
    enc, _ = encode_samples(s, fake_encode, max_length=3, truncate=True, encode_target=lambda t: [9])
    assert enc[0].target_ids == [9]


def test_encode_called_once_per_sample() -> None:
    calls: list[str] = []

    def enc(t: str) -> list[int]:
        calls.append(t)
        return [1]

    encode_samples([Sample("a"), Sample("b")], enc, max_length=2, truncate=True)
    assert calls == ["a", "b"]


# ---------------------------------------------------------------- batching


def skewed_lengths(n: int = 2000) -> list[int]:
    rng = random.Random(0)
    return [int(rng.lognormvariate(3, 1)) + 1 for _ in range(n)]


def padding(lengths: list[int], batches: list[list[int]]) -> int:
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_length_grouping_deterministic_and_complete() -> None:
    lengths = skewed_lengths()
    a = length_grouped_batches(lengths, 16, seed=3, epoch=1)
    assert a == length_grouped_batches(lengths, 16, seed=3, epoch=1)
    assert a != length_grouped_batches(lengths, 16, seed=3, epoch=2)
    assert a != length_grouped_batches(lengths, 16, seed=4, epoch=1)
    flat = [i for b in a for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert sum(len(b) < 16 for b in a) <= 1 and all(len(b) <= 16 for b in a)


def test_length_grouping_reduces_padding() -> None:
    lengths = skewed_lengths()
    grouped = length_grouped_batches(lengths, 16, seed=0, epoch=0, group_factor=20)
    perm = list(range(len(lengths)))
    random.Random(0).shuffle(perm)
    rand = [perm[i : i + 16] for i in range(0, len(perm), 16)]
    assert padding(lengths, grouped) < 0.5 * padding(lengths, rand)


def test_length_grouping_no_shuffle_and_small() -> None:
    assert length_grouped_batches([5, 1, 3, 2, 4], 2, seed=0, epoch=0, shuffle=False) == [[0, 1], [2, 3], [4]]
    assert length_grouped_batches([], 4, seed=0, epoch=0) == []
    assert sorted(length_grouped_batches([1, 2, 3], 8, seed=0, epoch=0)[0]) == [0, 1, 2]


def test_sorted_batches() -> None:
    lengths = [3, 9, 1, 7, 5]
    b = sorted_batches(lengths, 2)
    assert b == [[1, 3], [4, 0], [2]]


def test_pad_left_right() -> None:
    seqs = [[1, 2, 3], [4], []]
    ids, mask = pad_left(seqs, 0)
    assert ids.shape == mask.shape == (3, 3) and ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    ids, mask = pad_right(seqs, 9)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9], [9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert pad_left([], 0)[0].shape == (0, 0)


def test_split_holdout() -> None:
    train, held = split_holdout(100, 0.1, seed=1)
    assert len(held) == 10 and sorted(train + held) == list(range(100))
    assert (train, held) == split_holdout(100, 0.1, seed=1)
    assert held != split_holdout(100, 0.1, seed=2)[1]
    assert len(split_holdout(100, 7, seed=0)[1]) == 7
    assert split_holdout(5, 0, seed=0) == ([0, 1, 2, 3, 4], [])
    assert len(split_holdout(3, 0.01, seed=0)[1]) == 1
    with pytest.raises(DataError):
        split_holdout(5, 5, seed=0)


# ---------------------------------------------------------------- the real benchmark files


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared benchmark data not found at {SHARED}")
def test_shared_benchmark_files() -> None:
    sst2 = DataConfig(template="{sentence}", labels="0=negative,1=positive")
    v = Verbalizer.parse(sst2.labels)
    dev = load_samples(str(SHARED / "sst2" / "dev.tsv"), sst2, v)
    assert len(dev) == 872 and {s.label for s in dev} == {0, 1}

    t = time.perf_counter()
    train = load_samples(str(SHARED / "sst2" / "train.tsv"), sst2, v)
    assert time.perf_counter() - t < 4.0  # < 2 s on an idle machine; slack for loaded CI
    assert len(train) == 67349

    rte = DataConfig(template="{premise}\\nQuestion: {hypothesis} True or False?")
    assert seen_labels(str(SHARED / "rte" / "train.jsonl"), rte) == ["entailment", "not_entailment"]
    assert len(load_samples(str(SHARED / "rte" / "train.jsonl"), rte, None)) == 2240
    assert len(load_samples(str(SHARED / "rte" / "val.jsonl"), rte, None)) == 277

    boolq = DataConfig(template="{passage}\\nQuestion: {question}?")
    assert seen_labels(str(SHARED / "boolq" / "val.jsonl"), boolq) == ["false", "true"]
    assert len(load_samples(str(SHARED / "boolq" / "train32.jsonl"), boolq, None)) == 32

    ag = DataConfig(columns="text,label")
    samples = load_samples(str(SHARED / "agnews" / "train10k.tsv"), ag, None)
    assert seen_labels(str(SHARED / "agnews" / "train10k.tsv"), ag) == ["Business", "Sci/Tech", "Sports", "World"]
    # The README says 10,000 rows; the file holds 10,001 lines, each one two-cell row (no header).
    n_lines = sum(1 for line in (SHARED / "agnews" / "train10k.tsv").open(encoding="utf-8") if line.strip())
    assert len(samples) == n_lines and abs(n_lines - 10000) <= 1
