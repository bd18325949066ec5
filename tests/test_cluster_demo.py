"""The demo's cluster step on the tiny BERT and synthetic corpus of the demo tests."""

from __future__ import annotations

import json

from tiny_text import make_tiny_bert, synthetic_corpus

from posthoc.data import stratified_split
from posthoc.demo.clusters import demo_step
from posthoc.demo.context import DemoContext, DemoSettings, Task
from posthoc.finetune import FinetuneSettings


def test_demo_step_reports_shuffle_tests_and_topics_and_reuses_its_output(tmp_path):
    base = make_tiny_bert(tmp_path / "base")
    settings = DemoSettings(finetune=FinetuneSettings(max_length=32),
                            tasks=(Task("A", ("alpha", "beta", "gamma")), Task("B", ("delta", "epsilon"))))
    split = stratified_split(synthetic_corpus(per_class=16), validation=settings.validation, test=settings.test, seed=0)
    splits = {t.name: split.subset(t.label_names) for t in settings.tasks}
    work = tmp_path / "work"

    def context(fresh):
        return DemoContext(work, base, {}, {}, splits, settings, fresh, 1, False)

    text = demo_step(context(False))
    out = work / "clusters" / "output"
    summary = json.loads((out / "clusters.json").read_text())
    lines = text.splitlines()
    assert [line.split(":")[0].strip() for line in lines[1:3]] == ["FFN 0", "FFN 1"]
    assert "of 2 FFNs are more modular than all 20 of their shuffles" in text
    assert "Top clusters by topic:" in text and f"Report: {out / 'report.html'}" in text
    assert (out / "report.html").is_file() and len(list((out / "modules").iterdir())) == len(summary["clusters"])
    # the printed numbers are the output's, and Q is the modularity of the saved partition of the saved graph
    unit = summary["units"][0]
    assert f"n-cut {unit['n-cut']['real']:.2f} vs shuffled {unit['n-cut']['shuffled_mean']:.2f}" in lines[1]
    assert len(unit["n-cut"]["shuffled"]) == 20 and summary["tokens"] > 0
    assert set(summary["function"]["labels"]) == {"alpha", "beta", "gamma", "delta", "epsilon"}
    import networkx as nx

    g = nx.read_graphml(out / "graphs" / "FFN_0.graphml")
    assert len(g) == 64 and all("cluster" in d for _, d in g.nodes(data=True))
    record = work / "clusters" / "demo.json"
    stamp = record.stat().st_mtime_ns
    assert "reused from the cache" in demo_step(context(False)) and record.stat().st_mtime_ns == stamp
    assert "reused from the cache" not in demo_step(context(True))
