"""The demo's MoE-fication step on the tiny BERT and synthetic corpus of the demo tests."""

from __future__ import annotations

import json

import torch
from tiny_text import make_tiny_bert, synthetic_corpus

import posthoc
from posthoc.analyse.evaluate import mean_cosine, sentence_embeddings
from posthoc.data import stratified_split
from posthoc.demo.context import DemoContext, DemoSettings, Task
from posthoc.demo.moe import TEST_PER_CLASS, demo_step
from posthoc.finetune import FinetuneSettings
from posthoc.models import load_model


def test_demo_step_scores_the_loaded_moe_and_reuses_its_output(tmp_path):
    base = make_tiny_bert(tmp_path / "base")
    settings = DemoSettings(finetune=FinetuneSettings(max_length=32),
                            tasks=(Task("A", ("alpha", "beta", "gamma")), Task("B", ("delta", "epsilon"))),
                            probe_steps=100)
    split = stratified_split(synthetic_corpus(), validation=settings.validation, test=settings.test, seed=0)
    splits = {t.name: split.subset(t.label_names) for t in settings.tasks}
    work = tmp_path / "work"

    def context(fresh):
        return DemoContext(work, base, {}, {}, splits, settings, fresh, 1, False)

    text = demo_step(context(False))
    lines = text.splitlines()
    assert any(line.startswith("MoE top-4/16") for line in lines) and any(line.startswith("MoE top-8/16") for line in lines)
    assert "fitted in" in text and "FFN block, 2,048 tokens, 1 thread" in text
    results = json.loads((work / "moe" / "results.json").read_text())
    assert [r["encoder"] for r in results["rows"]] == ["dense", "MoE top-4/16", "MoE top-8/16"]

    # the reported cosine, recomputed from the output directory with plain transformers for the dense side
    tests = [t for name in ("A", "B") for t in splits[name].test.limit_per_class(TEST_PER_CLASS).texts]
    dense_model, tok, _ = load_model(base)
    dense = sentence_embeddings(dense_model, tok, tests, max_length=32)
    moe = sentence_embeddings(posthoc.load(work / "moe" / "model", top_k=4), tok, tests, max_length=32)
    assert abs(results["rows"][1]["cosine"] - mean_cosine(moe, dense)) < 1e-5
    assert not torch.allclose(moe, dense, atol=1e-7)  # a quarter of the neurons: not the dense model
    for row in results["rows"]:
        assert all(0.0 <= acc <= 1.0 for acc in row["probe_accuracy"].values())

    experts = work / "moe" / "model" / "experts.safetensors"
    stamp = experts.stat().st_mtime_ns
    assert "cached" in demo_step(context(False)) and experts.stat().st_mtime_ns == stamp
    assert "fitted in" in demo_step(context(True))  # fresh: fitted again
