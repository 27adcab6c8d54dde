"""Files -> labelled text samples -> token batches.

This module knows nothing about models: tokenisation comes in as a function. Every user-facing error is a
`DataError` whose one-line message names the file, the 1-based line (as an editor shows it) and the field or flag
to fix, because a data mistake deep in a 67k-row file is otherwise hard to find.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import io
import json
import os
import re
import string
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from softprompt.config import DataConfig


class DataError(ValueError):
    """A problem in the data or in a data flag; the message is one line naming file:line and the field or flag."""


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    # Building ~100k small acyclic dicts triggers many useless collections; pausing GC halves SST-2's load time.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _to_str(value: Any) -> str:
    # JSON booleans must read "true"/"false" (BoolQ), not Python's "True"; integral floats (pandas exports
    # write labels as 1.0) read like the ints they stand for; nested values stay valid JSON.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _record(obj: dict[Any, Any]) -> dict[str, str]:
    # A null value counts as absent, so that "missing field" errors and require_targets=False treat it alike.
    return {str(k): _to_str(v) for k, v in obj.items() if v is not None}


def _read_text(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    if not os.path.isfile(path):
        raise DataError(f"{path}: {'is a directory, not a data file' if os.path.isdir(path) else 'file not found'}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")  # -sig: files saved by Excel start with a BOM that would rename column 1
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start}); re-save the file as UTF-8") from None


def _jsonl(text: str, name: str) -> list[tuple[int, dict[str, str]]]:
    out = []
    # split("\n"), not splitlines(): JSON strings may legally hold raw U+2028/U+0085, which splitlines breaks on.
    for i, line in enumerate(text.split("\n"), 1):
        if not (line := line.strip()):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{i}: malformed JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{name}:{i}: expected a JSON object per line, got {type(obj).__name__}")
        out.append((i, _record(obj)))
    return out


_WS = re.compile(r"\s*")


def _json_list(text: str, name: str) -> list[tuple[int, dict[str, str]]]:
    # A list of objects, scanned element by element with raw_decode so each record keeps the line it starts on.
    # A .json file that really holds JSON lines (a common export) is read as such.
    skip = lambda p: _WS.match(text, p).end()  # type: ignore[union-attr]  # noqa: E731
    dec, out, pos, line, last = json.JSONDecoder(), [], skip(0), 1, 0
    if pos == len(text) or text[pos] == "{":
        return _jsonl(text, name)
    if text[pos] != "[":
        raise DataError(f"{name}:{text.count(chr(10), 0, pos) + 1}: expected a JSON list of objects")
    pos = skip(pos + 1)
    while not text.startswith("]", pos):
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
        line, last = line + text.count("\n", last, pos), pos  # counted incrementally: linear in the file size
        if not isinstance(obj, dict):
            raise DataError(f"{name}:{line}: expected a JSON object, got {type(obj).__name__}")
        out.append((line, _record(obj)))
        pos = skip(end)
        if text.startswith(",", pos):
            pos = skip(pos + 1)
        elif not text.startswith("]", pos):
            line += text.count("\n", last, pos)
            raise DataError(f"{name}:{line}: malformed JSON (expected ',' or ']' after the object)")
    return out


def _delimited(text: str, name: str, tsv: bool, columns: list[str] | None) -> list[tuple[int, dict[str, str]]]:
    # GLUE TSVs contain bare quote characters, so .tsv is read with quoting off; .csv uses normal quoting.
    if tsv:
        rows = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        rows = csv.reader(io.StringIO(text, newline=""))
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long passages exceed the 128 KiB default
    header, what = (columns, "--columns") if columns else (None, "the header row")
    out: list[tuple[int, dict[str, str]]] = []
    prev = 0  # line_num after the previous row: a quoted cell may span lines, so a row starts at prev + 1
    try:
        for row in rows:
            line, prev = prev + 1, rows.line_num
            if header is not None and len(row) == len(header):  # the hot path: one check per row
                out.append((line, dict(zip(header, row, strict=False))))
            elif not row:
                continue
            elif header is None:
                header = [h.strip() for h in row]
            else:
                raise DataError(f"{name}:{line}: row has {len(row)} cells, {what} names {len(header)}")
    except csv.Error as e:
        raise DataError(f"{name}:{rows.line_num}: malformed {'TSV' if tsv else 'CSV'} ({e})") from None
    return out


def _hf(spec: str) -> list[tuple[int, dict[str, str]]]:
    try:
        import datasets  # optional: not a dependency of softprompt
    except ImportError:
        raise DataError(f"{spec}: the `datasets` package is not installed (pip install datasets)") from None
    parts = spec[3:].split(":")
    name, config, split = parts[0], (parts[1] if len(parts) == 3 else None), (parts[-1] if len(parts) > 1 else "train")
    if not name or len(parts) > 3:
        raise DataError(f"{spec}: expected hf:NAME[:SPLIT] or hf:NAME:CONFIG:SPLIT")
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many types; the user needs the message, on one line
        msg = str(e).strip().splitlines()
        raise DataError(f"{spec}: cannot load dataset ({msg[0] if msg else type(e).__name__})") from None
    return [(i, _record(row)) for i, row in enumerate(ds, 1)]


@_gc_paused()
def read_records(path: str, columns: list[str] | None = None) -> list[tuple[int, dict[str, str]]]:
    """(line_number, record) pairs from a .jsonl/.json-lines/.ndjson, .json, .csv, .tsv or .txt file, "-" (stdin
    JSON lines) or hf:NAME[:SPLIT] (Hugging Face `datasets`). `columns` names the cells of a headerless CSV/TSV."""
    name = "<stdin>" if path == "-" else path
    if path.startswith("hf:"):
        records = _hf(path)
    else:
        ext = "jsonl" if path == "-" else os.path.splitext(path)[1].lower().lstrip(".")
        if ext not in ("jsonl", "json-lines", "ndjson", "json", "csv", "tsv", "txt"):
            raise DataError(f"{path}: unknown file type '.{ext}' (use .jsonl, .json, .csv, .tsv or .txt)")
        text = _read_text(path)
        if ext in ("csv", "tsv"):
            records = _delimited(text, name, ext == "tsv", columns)
        elif ext == "json":
            records = _json_list(text, name)
        elif ext == "txt":  # one input per line, as field "text" (for quick predictions)
            records = [(i, {"text": s.rstrip("\r")}) for i, s in enumerate(text.split("\n"), 1) if s.strip()]
        else:
            records = _jsonl(text, name)
    if not records:
        raise DataError(f"{name}: no records")
    return records


_ESCAPE = re.compile(r"\\([\\nt])")


class Template:
    """An input template with {field} placeholders; `\\n`, `\\t` (and `\\\\`) typed on a command line are
    decoded so that `--template "Q: {q}\\nA:"` works without shell quoting tricks. `{{` is a literal brace."""

    def __init__(self, text: str, flag: str = "--template") -> None:
        self.flag = flag
        self.text = _ESCAPE.sub(lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)
        try:
            self._parts = list(string.Formatter().parse(self.text))
        except ValueError as e:
            raise DataError(f"{flag}: bad template {text!r} ({e}; write {{{{ for a literal brace)") from None
        for _, name, spec, conv in self._parts:
            # Plain {field} only: "{a.b}" is the key "a.b" (flattened column names), never attribute access.
            if name is not None and (not name.strip() or spec or conv):
                raise DataError(
                    f"{flag}: bad placeholder in {text!r} (write {{field}}; no format specs or !conversions)"
                )
        self.fields: list[str] = list(dict.fromkeys(n for _, n, _, _ in self._parts if n is not None))
        if not self.fields:
            raise DataError(f"{flag}: template {text!r} has no {{field}} placeholder (e.g. {{text}})")

    def fill(self, record: dict[str, str], where: str, hint: str = "") -> str:
        """The template with each placeholder replaced by record[field]; `hint` is appended to a missing-field error."""
        out = []
        for literal, name, _, _ in self._parts:
            out.append(literal)
            if name is not None:
                try:
                    out.append(record[name])
                except KeyError:
                    msg = f"{where}: missing field '{name}' (needed by {self.flag}){_has(record, hint)}"
                    raise DataError(msg) from None
        return "".join(out)


def _has(record: dict[str, str], hint: str) -> str:
    # Name the fields a record does have (shortened: a headerless file turns a whole sentence into a "name").
    names = ", ".join(k if len(k) <= 40 else k[:37] + "..." for k in list(record)[:8])
    return f"; the record has: {names}{hint}" if record else hint


@dataclass
class Verbalizer:
    """Class names (stable order = class indices) and the text each one is scored as."""

    labels: list[str]
    words: list[str]

    @classmethod
    def parse(cls, spec: str | None, seen_labels: list[str] | None = None) -> Verbalizer:
        """From --labels "entailment=yes,not_entailment=no" (spec order); None: each seen label is its own word."""
        if spec is None or not spec.strip():
            if not seen_labels:
                raise DataError("--labels: not given and no labels were seen in the training data")
            return cls(list(seen_labels), list(seen_labels))
        labels: list[str] = []
        words: list[str] = []
        for item in (s.replace("\\,", ",") for s in re.split(r"(?<!\\),", spec)):  # "\," is a literal comma
            label, eq, word = item.partition("=")
            label, word = label.strip(), word.strip()
            if not eq or not label or not word:
                raise DataError(f"--labels: expected label=word, got {item.strip()!r} in {spec!r}")
            if label in labels:
                raise DataError(f"--labels: label {label!r} is given twice in {spec!r}")
            if word in words:  # two classes scored by one text can never be told apart
                other = labels[words.index(word)]
                raise DataError(f"--labels: labels {other!r} and {label!r} share the word {word!r}")
            labels.append(label)
            words.append(word)
        return cls(labels, words)

    def __post_init__(self) -> None:
        self._index = {label: i for i, label in enumerate(self.labels)}

    def index(self, label: str, where: str) -> int:
        try:
            return self._index[label]
        except KeyError:
            known = ", ".join(self.labels)
            raise DataError(f"{where}: label {label!r} is not in the verbalizer (--labels knows: {known})") from None

    def to_meta(self) -> dict[str, list[str]]:
        return {"labels": list(self.labels), "words": list(self.words)}

    @classmethod
    def from_meta(cls, d: dict[str, Any]) -> Verbalizer:
        labels, words = d.get("labels"), d.get("words")
        if not isinstance(labels, list) or not isinstance(words, list) or len(labels) != len(words) or not labels:
            raise DataError("verbalizer metadata: expected equal-length non-empty 'labels' and 'words' lists")
        return cls([str(x) for x in labels], [str(x) for x in words])


@dataclass
class Sample:
    text: str  # filled template
    label: int | None = None  # class index (classify)
    target: str | None = None  # target text (generate)
    where: str = ""  # "file:line" for error messages
    record: dict[str, str] = field(default_factory=dict)


def _columns(cfg: DataConfig) -> list[str] | None:
    if not cfg.columns:
        return None
    cols = [c.strip() for c in cfg.columns.split(",")]
    if not all(cols) or len(set(cols)) != len(cols):
        raise DataError(f"--columns: expected distinct comma-separated names, got {cfg.columns!r}")
    return cols


def _headerless_hint(path: str, cfg: DataConfig) -> str:
    # The usual cause of a missing field in a CSV/TSV is a file without a header row read as if it had one.
    if cfg.columns is None and path.lower().endswith((".csv", ".tsv")):
        return " (if the file has no header row, name its columns with --columns)"
    return ""


def sort_labels(labels: Iterable[str]) -> list[str]:
    """Distinct labels sorted; numerically when all are integers, so "10" comes after "2"."""
    distinct = set(labels)
    if all(re.fullmatch(r"-?\d+", s) for s in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def _label_of(record: dict[str, str], cfg: DataConfig) -> str | None:
    value = record.get(cfg.label_field, "").strip()  # TSV cells often carry stray spaces: "1 " is label "1"
    return value or None


def _labels_in(
    records: list[tuple[int, dict[str, str]]], name: str, cfg: DataConfig, hint: str, strict: bool
) -> list[str]:
    out = []
    for line, rec in records:
        label = _label_of(rec, cfg)
        if label is not None:
            out.append(label)
        elif strict:
            raise DataError(f"{name}:{line}: missing field '{cfg.label_field}' (--label-field){_has(rec, hint)}")
    return sort_labels(out)


def seen_labels(path: str, cfg: DataConfig) -> list[str]:
    """The distinct labels of a (training) file, sorted, for building a default verbalizer."""
    name, hint = ("<stdin>" if path == "-" else path), _headerless_hint(path, cfg)
    return _labels_in(read_records(path, _columns(cfg)), name, cfg, hint, strict=True)


@_gc_paused()
def load_samples(
    path: str, cfg: DataConfig, verbalizer: Verbalizer | None, *, require_targets: bool = True
) -> list[Sample]:
    """Read `path`, fill cfg.template and attach the class index (classify) or target text (generate).

    For classify with verbalizer=None, the verbalizer is built from cfg.labels and this file's labels: pass the
    training verbalizer when loading evaluation data so that class indices agree. require_targets=False
    (prediction) accepts records without a label/target.
    """
    template = Template(cfg.template)
    answer = cfg.label_field if cfg.task == "classify" else cfg.target_field
    if answer in template.fields:  # the model would read the answer in its input
        flag = "--label-field" if cfg.task == "classify" else "--target-field"
        raise DataError(f"--template: uses {{{answer}}}, the {flag}; the model would see the answer")
    name, hint = ("<stdin>" if path == "-" else path), _headerless_hint(path, cfg)
    records = read_records(path, _columns(cfg))
    if cfg.task == "classify" and verbalizer is None:
        labels = _labels_in(records, name, cfg, hint, strict=require_targets)
        if not labels and not cfg.labels:
            raise DataError(f"{name}: no '{cfg.label_field}' values to build a verbalizer from (give --labels)")
        verbalizer = Verbalizer.parse(cfg.labels, labels)
    samples = []
    for line, rec in records:
        where = f"{name}:{line}"
        sample = Sample(template.fill(rec, where, hint), where=where, record=rec)
        if cfg.task == "classify":
            label = _label_of(rec, cfg)
            if label is not None:
                assert verbalizer is not None
                sample.label = verbalizer.index(label, where)
            elif require_targets:
                raise DataError(f"{where}: missing field '{cfg.label_field}' (--label-field){_has(rec, hint)}")
        else:
            target = rec.get(cfg.target_field)
            if target is not None and target.strip():
                sample.target = target
            elif require_targets:
                what = "missing" if target is None else "empty"
                raise DataError(f"{where}: {what} field '{cfg.target_field}' (--target-field){_has(rec, hint)}")
        samples.append(sample)
    return samples


@dataclass
class Encoded:
    input_ids: list[int]
    label: int | None
    target_ids: list[int] | None
    truncated: bool


def encode_samples(
    samples: list[Sample],
    encode: Callable[[str], list[int]],
    *,
    max_length: int,
    truncate: bool,
    flag: str = "--max-length",
    encode_target: Callable[[str], list[int]] | None = None,
    max_target_length: int = 64,
    keep_first: int = 0,
) -> tuple[list[Encoded], int]:
    """Tokenise every sample once. Over-long inputs keep their LAST max_length tokens (the end of a template
    carries the question, e.g. "Sentiment:"), plus the first `keep_first` (e.g. a BOS token) when asked.
    Returns the encodings and how many inputs were truncated; truncate=False makes an over-long input an error."""
    if max_length < 1 or not 0 <= keep_first < max_length:
        raise ValueError(f"{flag}: need max_length >= 1 and 0 <= keep_first < max_length")
    encode_target = encode_target or encode
    out: list[Encoded] = []
    n_truncated = 0
    for s in samples:
        ids = list(encode(s.text))
        if not ids:
            raise DataError(f"{s.where}: input is empty after tokenisation (check --template)")
        cut = len(ids) > max_length
        if cut:
            if not truncate:
                raise DataError(
                    f"{s.where}: input has {len(ids)} tokens, more than {flag} {max_length} "
                    "(drop --no-truncate to truncate)"
                )
            ids = ids[:keep_first] + ids[len(ids) - (max_length - keep_first) :]
            n_truncated += 1
        target_ids = None
        if s.target is not None:
            target_ids = list(encode_target(s.target))[:max_target_length]  # targets keep their start
        out.append(Encoded(ids, s.label, target_ids, cut))
    return out, n_truncated


def _generator(seed: int, epoch: int) -> torch.Generator:
    # One generator per (seed, epoch): epochs differ, reruns (and resumed runs) repeat exactly.
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))


def length_grouped_batches(
    lengths: list[int], batch_size: int, *, seed: int, epoch: int, shuffle: bool = True, group_factor: int = 50
) -> list[list[int]]:
    """Batches of indices of similar length (less padding): shuffle, sort within mega-chunks of
    batch_size*group_factor, cut into batches, shuffle the batch order. Deterministic for (seed, epoch);
    shuffle=False gives consecutive batches in the original order."""
    if batch_size < 1 or group_factor < 1:
        raise ValueError("batch_size and group_factor must be >= 1")
    n = len(lengths)
    if not shuffle:
        return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    g = _generator(seed, epoch)
    perm = torch.randperm(n, generator=g).tolist()
    chunk = batch_size * group_factor  # a multiple of batch_size: only the very last batch can be short
    batches: list[list[int]] = []
    for c in range(0, n, chunk):
        part = sorted(perm[c : c + chunk], key=lambda i: lengths[i])
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


def sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches, longest first (an out-of-memory shows at once); callers restore the original order."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _pad(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):  # an empty sequence is an all-padding row
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each (B, T) long, padded on the left (decoder-only inputs end at the same column)."""
    return _pad(seqs, pad_id, left=True)


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each (B, T) long, padded on the right."""
    return _pad(seqs, pad_id, left=False)


def split_holdout(n: int, fraction_or_count: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, held-out) index lists, each in ascending order. A value in (0, 1) is a fraction of
    n (at least one example), a value >= 1 a count; 0 holds nothing out."""
    if fraction_or_count < 0 or (fraction_or_count > 1 and not float(fraction_or_count).is_integer()):
        raise ValueError(f"hold-out must be a fraction in [0, 1) or a whole count, got {fraction_or_count}")
    if fraction_or_count == 0 or n == 0:
        return list(range(n)), []
    k = max(1, round(n * fraction_or_count)) if fraction_or_count < 1 else int(fraction_or_count)
    if k >= n:
        raise DataError(f"holding out {k} of {n} examples leaves none to train on")
    perm = torch.randperm(n, generator=_generator(seed, -1)).tolist()
    return sorted(perm[k:]), sorted(perm[:k])
