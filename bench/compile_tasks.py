"""The compile study's tasks (bench.compile): each task's files under ../shared/data, template, verbalizer and
hand-written instructions, and its fixed-seed samples (the same training and evaluation rows for every method)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True)
class Task:
    name: str
    train: str  # under SHARED
    eval: str | None  # None: hold out the last HOLDOUT shuffled train rows
    template: str
    labels: str
    instructions: str  # the hand-written part of the hard prompt (in front of the demonstrations)
    columns: str | None = None
    long_demo_words: int = 0  # > 0: also a 16-shot context of demonstrations with at least this many words


HOLDOUT = 1000
TASKS = {
    "sst2": Task(
        "SST-2", "sst2/train.tsv", "sst2/dev.tsv", "Review: {sentence}\nSentiment:", "0=negative,1=positive",
        "You are a careful film critic. Below are short movie reviews, one per paragraph, each followed by its "
        "sentiment. The sentiment is positive when the reviewer liked the film, its acting, its story or its "
        "direction, and negative when the reviewer disliked it, found it dull, badly made or a waste of time. "
        "Mixed reviews take the sentiment of their overall verdict. Answer with one word: positive or negative.",
        long_demo_words=15,  # SST-2's train split is mostly phrase fragments, its dev split whole sentences
    ),
    "agnews": Task(
        "AG News", "agnews/train10k.tsv", None, "Article: {text}\nTopic:",
        "World=world,Sports=sports,Business=business,Sci/Tech=technology",
        "Classify each news article by its topic. The topic is world for international news and politics, sports "
        "for sports, business for companies, markets and the economy, and technology for science and technology. "
        "Answer with one word.",
        columns="text,label",
    ),
    "rte": Task(
        "RTE", "rte/train.jsonl", "rte/val.jsonl", "{premise}\nQuestion: {hypothesis} True or false?\nAnswer:",
        "entailment=true,not_entailment=false",
        "Each passage is followed by a statement. Answer true when the passage implies the statement, false "
        "otherwise.",
    ),
}  # fmt: skip


def sample(t: Task, train_n: int, eval_n: int, tmp: Path, min_words: int = 0) -> tuple[str, str] | str:
    """(train file, eval file): fixed-seed samples as JSONL, no eval row's text in train; or why not. min_words > 0:
    only training rows whose first field has at least that many words (the same evaluation rows)."""
    from softprompt.data import read_records

    src = SHARED / t.train
    if not src.is_file() or (t.eval and not (SHARED / t.eval).is_file()):
        return f"skipped: {src if not src.is_file() else SHARED / str(t.eval)} not found"
    cols = t.columns.split(",") if t.columns else None
    pool = [r for _, r in read_records(str(src), cols)]
    random.Random(0).shuffle(pool)
    if t.eval:
        ev = [r for _, r in read_records(str(SHARED / t.eval))]
        random.Random(0).shuffle(ev)
    else:
        pool, ev = pool[:-HOLDOUT], pool[-HOLDOUT:]
    ev = ev[:eval_n]
    seen = {json.dumps(r, sort_keys=True) for r in ev}
    tr = [r for r in pool if json.dumps(r, sort_keys=True) not in seen]
    if min_words:
        first = next(iter(tr[0]))  # the text field (records keep the file's field order)
        tr = [r for r in tr if len(str(r[first]).split()) >= min_words]
    tr = tr[:train_n]
    paths = []
    tmp.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", tr), ("eval", ev)):
        p = tmp / f"{t.name}-{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        paths.append(str(p))
    return paths[0], paths[1]
