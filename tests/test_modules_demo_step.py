"""The demo's modules step on a tiny BERT: modules extracted, stacked, scored like the demo; cached."""

from __future__ import annotations

import json

import pytest
from tiny_text import make_tiny_bert, synthetic_corpus

import posthoc.demo.modules as demo_modules
from posthoc.data import stratified_split
from posthoc.demo.context import DemoContext, DemoSettings, Task
from posthoc.demo.modules import DENSITY, demo_rank, demo_step
from posthoc.finetune import ClassificationHead, FinetuneSettings, evaluate, finetune
from posthoc.modules.apply import stack
from posthoc.modules.module import open_module

TINY = DemoSettings(
    finetune=FinetuneSettings(steps=12, batch_size=8, max_length=32, encoder_lr=1e-3, head_lr=1e-2),
    tasks=(Task("A", ("alpha", "beta", "gamma")), Task("B", ("delta", "epsilon"))),
)


@pytest.fixture(scope="module")
def context(tmp_path_factory) -> DemoContext:
    root = tmp_path_factory.mktemp("demo-step")
    base = make_tiny_bert(root / "base")
    split = stratified_split(synthetic_corpus(), validation=TINY.validation, test=TINY.test, seed=TINY.split_seed)
    splits = {t.name: split.subset(t.label_names) for t in TINY.tasks}
    finetuned = {t.name: root / f"finetune-{t.name}" for t in TINY.tasks}
    for name, out in finetuned.items():
        finetune(base, splits[name].train, out, settings=TINY.finetune, threads=1, progress=False, name=name)
    heads = {name: ClassificationHead.load(path) for name, path in finetuned.items()}
    return DemoContext(root / "work", base, finetuned, heads, splits, TINY, False, 1, False)


def test_demo_step_scores_the_stacked_modules_and_reuses_them(context, tmp_path, monkeypatch):
    text = demo_step(context)
    root = context.work_dir / "modules"
    record = json.loads((root / "demo_step.json").read_text())
    rank = demo_rank(context.base_dir)
    assert rank == 8  # a quarter of the tiny BERT's width (32): factors smaller than the matrices
    assert [r["label"] for r in record["rows"]] == [f"sparse d={DENSITY}", f"LoRA r={rank}"]
    assert sorted(p.name for p in root.iterdir()) == ["demo_step.json", "lora-A", "lora-B", "sparse-A", "sparse-B"]
    with open_module(root / "lora-A") as lora, open_module(root / "sparse-B") as sparse:
        assert lora.kind == "lora" and {lora.rank(n) for n in lora.names} - {None} == {rank}
        assert sparse.kind == "sparse" and sparse.manifest.tags["task"] == "B"
    # the accuracies are those of the stacked encoder evaluated independently with each task's head
    for row in record["rows"]:
        stacked = stack(context.base_dir, [root / f"{row['kind']}-A", root / f"{row['kind']}-B"], tmp_path / row["kind"],
                        progress=False).out_dir
        for name, split in context.splits.items():
            expected = evaluate(stacked, context.finetuned[name], split.test.texts, split.test.labels, max_length=32, threads=1)
            assert row["accuracy"][name] == pytest.approx(expected, abs=1e-9), (row["kind"], name)
        assert all(0 < e < 1 for e in row["energy_kept"].values())
        assert f"{row['accuracy']['A']:.3f}" in text
    assert "sparse d=0.05" in text and f"LoRA r={rank}" in text and "(cached)" not in text

    # a second run reuses the modules and the scores; fresh redoes them
    def refuse(*args, **kwargs):
        raise AssertionError("the cached step extracted again")

    monkeypatch.setattr(demo_modules, "extract", refuse)
    again = demo_step(context)
    assert again.endswith("(cached)") and again.split("\n\ntime:")[0] == text.split("\n\ntime:")[0]
    with pytest.raises(AssertionError, match="extracted again"):
        demo_step(DemoContext(**{**context.__dict__, "fresh": True}))
