"""softprompt.loaded: the one loaded-prompt type behind the Python API (Predictor) and the server (Registry).

Both consumers must build the same thing from a file (checkpoint, spec, bound task, head, prefix), the refusals
must name the file, and a head travels as an argument: loading or scoring never sets the shared pm.head.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from test_ensemble import LABELS3, backbone, with_linear_head, write_prompts
from test_ensemble import root as root  # noqa: F401  (the module-scoped fixture)

from softprompt.api import Predictor
from softprompt.checkpoint import CheckpointError, load_prompt, save_prompt
from softprompt.loaded import LoadedPrompt, TaskCache, ensemble_head, load
from softprompt.prefix import LinearHead, PerPromptHeads, SimilarityHead
from softprompt.prompted import PromptedModel
from softprompt.serve import Registry

PACKAGE = Path(__file__).resolve().parent.parent / "softprompt"


@pytest.mark.parametrize("kind,head", [("llama", "lm"), ("llama", "linear"), ("bert", "similarity")])
def test_one_loader_for_api_and_server(kind: str, head: str, root: Path, tmp_path: Path) -> None:  # noqa: F811
    """Predictor and Registry hold the same LoadedPrompt: same label ids, same head kind, same prefix, same scores,
    and neither sets pm.head."""
    bb = backbone(kind, root)
    (path,) = write_prompts(bb, tmp_path, [3], LABELS3, seed=1)
    if head == "linear":
        with_linear_head(bb, path, 3, seed=4)
    pred = Predictor.load(path, backbone=bb)
    reg = Registry(bb, tmp_path)
    (entry,) = reg.entries()
    assert isinstance(entry.prompt, LoadedPrompt) and isinstance(pred.members[0], LoadedPrompt)
    assert entry.label_ids == pred.task.label_ids == pred.members[0].label_ids
    want = {"lm": type(None), "linear": LinearHead, "similarity": SimilarityHead}[head]
    assert isinstance(pred.head, want) and isinstance(entry.head, want)
    assert pred.pm.head is None and entry.pm.head is None  # heads are arguments, never shared state
    p1, p2 = pred.prefix, entry.prompt.prefix()
    torch.testing.assert_close(p1.embeds, p2.embeds)
    ex, _ = pred.task.encode_texts(["a great film", "dull"])
    batch = pred.pm.collate([e.input_ids for e in ex]).to(p1.mask.device)
    with torch.no_grad():
        a = pred.pm.label_scores(p1, None, batch, pred.task.label_ids, head=pred.head)
        b = entry.pm.label_scores(p2, None, batch, entry.label_ids, head=entry.head)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pred.probs(ex), a.softmax(-1).cpu(), atol=1e-5, rtol=1e-5)


def test_refusals_name_the_file(root: Path, tmp_path: Path) -> None:  # noqa: F811
    bb = backbone("llama", root)
    pm = PromptedModel(bb)
    (path,) = write_prompts(bb, tmp_path, [2], LABELS3)
    ck = load_prompt(path)
    save_prompt(path, ck.prompt, {**ck.meta, "family": "seq2seq"})
    with pytest.raises(CheckpointError, match=r"safetensors: trained on a seq2seq model, the served model is a causal"):
        load(path, bb, pm)
    save_prompt(path, ck.prompt, {**ck.meta, "head": "linear"})  # --head linear without its tensors
    with pytest.raises(CheckpointError, match=r"safetensors: a --head linear prompt without its head\.linear"):
        load(path, bb, pm)
    save_prompt(path, torch.randn(2, bb.embed_dim + 1), ck.meta)
    with pytest.raises(CheckpointError):
        load(path, bb, pm)


def test_task_cache_shares_equal_specs_only(root: Path, tmp_path: Path) -> None:  # noqa: F811
    bb = backbone("llama", root)
    pm = PromptedModel(bb)
    a, b = write_prompts(bb, tmp_path, [2, 2], LABELS3)
    (c,) = write_prompts(bb, tmp_path, [3], LABELS3, seed=2)  # another prompt length: another max input length
    cache = TaskCache()
    la, lb, lc = (load(p, bb, pm, tasks=cache) for p in (a, b, c))
    assert la.task is lb.task and lc.task is not la.task
    assert la.prefix_key != lb.prefix_key  # different prompt tensors: different prefixes
    assert load(a, bb, pm).prefix_key == la.prefix_key


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_ensemble_head(kind: str, root: Path, tmp_path: Path) -> None:  # noqa: F811
    bb = backbone(kind, root)
    pm = PromptedModel(bb)
    paths = write_prompts(bb, tmp_path, [2, 3], "0=bad,1=good,2=fine")
    first = load(paths[0], bb, pm)
    members = [first, load(paths[1], bb, pm, task=first.task)]
    alike = ensemble_head(members)
    assert alike is first.head  # all score alike: the one head (None = verbalizer, or the similarity head)
    with_linear_head(bb, paths[1], 3, seed=2)
    mixed = ensemble_head([first, load(paths[1], bb, pm, task=first.task)])
    assert isinstance(mixed, PerPromptHeads)
    assert pm.head is None


def test_member_scoring_unlike_its_shared_task(root: Path, tmp_path: Path) -> None:  # noqa: F811
    """An encoder ensemble of a --head linear prompt and a similarity prompt, in both orders: the member that scores
    unlike the task it shares keeps its own scoring (alone and in the ensemble), and the ensemble is the mean of
    the members alone."""
    from test_ensemble import TEXTS, single_probs

    bb = backbone("bert", root)
    lin, sim = write_prompts(bb, tmp_path, [3, 4], LABELS3, seed=9)
    with_linear_head(bb, lin, 3, seed=5)
    single = single_probs(bb, [lin, sim])
    for order, want in (([lin, sim], single.mean(0)), ([sim, lin], single.mean(0))):
        ens = Predictor.load(order, backbone=bb)
        kinds = [type(m.head) for m in ens.members]
        assert sorted(k.__name__ for k in kinds) == ["LinearHead", "SimilarityHead"]
        assert isinstance(ens.head, PerPromptHeads) and ens.pm.head is None
        torch.testing.assert_close(ens.probs(ens.task.encode_texts(TEXTS)[0]), want, atol=1e-5, rtol=1e-5)


def test_generate_prompt_has_no_head(root: Path, tmp_path: Path) -> None:  # noqa: F811
    bb = backbone("llama", root)
    (path,) = write_prompts(bb, tmp_path, [2], LABELS3)
    ck = load_prompt(path)
    save_prompt(path, ck.prompt, {**ck.meta, "task": "generate", "labels": None})
    lp = load(path, bb, lambda position: PromptedModel(bb, position=position))
    assert lp.kind == "generate" and lp.head is None and lp.labels is None and lp.label_ids == []
    assert lp.prefix().mask.shape == (1, lp.ckpt.num_tokens + len(lp.pm.prefix_ids))


def test_no_module_outside_prompted_assigns_pm_head() -> None:
    """`pm.head = ...` (any `X.head =` on a PromptedModel) only in prompted.py; train.py and multitask.py are owned
    elsewhere and listed until they pass heads as arguments."""
    pending: set[str] = set()
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "prompted.py" or path.name in pending:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else []
            for t in targets:
                if isinstance(t, ast.Attribute) and t.attr == "head" and "pm" in ast.unparse(t.value):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, offenders
