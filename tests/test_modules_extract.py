"""`posthoc extract`: delta, sparse (LT-SFT top-k) and LoRA (truncated SVD), checked against direct formulas."""
# ruff: noqa: F811  (fixtures imported from modules_common are redefined as test arguments)

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import read_all
from modules_common import (  # noqa: F401  (fixtures)
    bert_pair,
    best_rank,
    changes,
    llama_tied_pair,
    lora_changes,
    outputs,
)
from posthoc.cli import main

from posthoc.modules.apply import stack
from posthoc.modules.extraction import extract
from posthoc.modules.module import open_module


def test_delta_is_the_task_vector(bert_pair, tmp_path):
    base, tuned = bert_pair
    result = extract(base, tuned[0], tmp_path / "delta", kind="delta", progress=False)
    phi = changes(base, tuned[0])
    stored = read_all(tmp_path / "delta")
    assert set(stored) == {n for n, p in phi.items() if p.abs().max() > 0}
    for name, value in stored.items():
        torch.testing.assert_close(value.double(), phi[name], atol=1e-7, rtol=0)
    assert result.relative_error == 0 and (tmp_path / "delta" / "report.html").is_file()
    manifest = json.loads((tmp_path / "delta" / "module.json").read_text())
    assert manifest["kind"] == "delta" and manifest["base"]["fingerprint"].startswith("sha256:")


def test_sparse_over_the_whole_model_is_the_global_top_k(bert_pair, tmp_path):
    base, tuned = bert_pair
    phi = changes(base, tuned[0])
    total = sum(p.numel() for p in phi.values())
    k = int(0.05 * total)
    flat = torch.cat([p.reshape(-1) for p in phi.values()])
    threshold = flat.abs().topk(k).values[-1]
    result = extract(base, tuned[0], tmp_path / "sparse", kind="sparse", density=0.05, progress=False)
    stored = read_all(tmp_path / "sparse")
    kept = 0
    for name, p in phi.items():
        expected = torch.nonzero(p.reshape(-1).abs() >= threshold).squeeze(1)
        if f"{name}.indices" not in stored:
            assert expected.numel() == 0, name
            continue
        indices = stored[f"{name}.indices"].long()
        assert torch.equal(indices, expected), name
        torch.testing.assert_close(stored[f"{name}.values"].double(), p.reshape(-1)[indices], atol=1e-7, rtol=0)
        kept += indices.numel()
    assert kept == k and sum(t.nnz for t in result.tensors) == k
    assert stored[next(iter(stored))].dtype in (torch.int32, torch.float32)
    dropped = torch.cat([p.reshape(-1)[p.reshape(-1).abs() < threshold] for p in phi.values()])
    assert result.relative_error == pytest.approx(float(dropped.norm() / flat.norm()), rel=1e-5)


def test_sparse_per_tensor_keeps_the_density_in_each_tensor(bert_pair, tmp_path):
    base, tuned = bert_pair
    extract(base, tuned[0], tmp_path / "sparse", kind="sparse", density=0.1, per_tensor=True, progress=False)
    with open_module(tmp_path / "sparse") as module:
        for name, p in changes(base, tuned[0]).items():
            k = max(1, int(0.1 * p.numel()))
            indices, _ = module.sparse(name)
            assert torch.equal(indices, p.reshape(-1).abs().topk(k).indices.sort().values), name


def test_lora_rank_is_the_truncated_svd_and_peft_loads_it(bert_pair, tmp_path):
    base, tuned = bert_pair
    result = extract(base, tuned[0], tmp_path / "lora", kind="lora", rank=3, progress=False)
    phi = changes(base, tuned[0])
    factored = lora_changes(tmp_path / "lora")  # read with PEFT's conventions, not ours
    assert "encoder.layer.0.attention.self.query.weight" in factored and "embeddings.word_embeddings.weight" in factored
    for name, approx in factored.items():
        torch.testing.assert_close(approx, best_rank(phi[name], 3), atol=2e-5, rtol=0)
        record = next(t for t in result.tensors if t.name == name)
        S = torch.linalg.svdvals(phi[name])
        assert record.relative_error == pytest.approx(float(S[3:].norm() / S.norm()), abs=1e-4)
    # norms and biases are kept whole; everything loads in PEFT exactly as our stacked checkpoint
    assert {t.storage for t in result.tensors} == {"lora", "dense"}
    stack(base, [tmp_path / "lora"], tmp_path / "stacked", progress=False)
    torch.testing.assert_close(outputs(base, tmp_path / "lora"), outputs(tmp_path / "stacked"), atol=1e-5, rtol=0)


def test_lora_energy_picks_the_smallest_rank(bert_pair, tmp_path):
    base, tuned = bert_pair
    result = extract(base, tuned[1], tmp_path / "lora", kind="lora", energy=0.8, max_rank=5, progress=False)
    phi = changes(base, tuned[1])
    for record in result.tensors:
        if record.storage != "lora":
            continue
        S2 = torch.linalg.svdvals(phi[record.name]).square()
        share = torch.cumsum(S2, 0) / S2.sum()
        expected = min(int((share < 0.8).sum()) + 1, 5)
        assert record.rank == expected, record.name


def test_tied_embeddings_load_in_peft_like_our_checkpoint(llama_tied_pair, tmp_path):
    base, tuned = llama_tied_pair
    extract(base, tuned[0], tmp_path / "lora", kind="lora", rank=4, progress=False)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert "lm_head" in config["target_modules"]  # the tied head gets the embedding's factors too
    stack(base, [tmp_path / "lora"], tmp_path / "stacked", progress=False)
    torch.testing.assert_close(
        outputs(base, tmp_path / "lora", causal=True), outputs(tmp_path / "stacked", causal=True), atol=1e-5, rtol=0
    )


def test_calibration_agreement_with_a_finetuned_head(tmp_path):
    from tiny_text import make_tiny_bert, synthetic_corpus

    from posthoc.data import stratified_split
    from posthoc.finetune import FinetuneSettings, finetune

    base = make_tiny_bert(tmp_path / "base")
    data = synthetic_corpus(per_class=20)
    split = stratified_split(data, validation=0.1, test=0.2, seed=0)
    finetune(base, split.train, tmp_path / "tuned", settings=FinetuneSettings(steps=8, batch_size=8, max_length=32,
             encoder_lr=1e-3), threads=2, progress=False)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(split.validation.texts[:16]))
    runner = CliRunner()
    result = runner.invoke(main, ["extract", str(base), str(tmp_path / "tuned"), str(tmp_path / "delta"), "--kind", "delta",
                                  "--calib", str(calib), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    fidelity = json.loads((tmp_path / "delta" / "fidelity.json").read_text())["calibration"]
    # a delta module reproduces the fine-tune: same hidden states, same labels from its head
    assert fidelity["hidden_cosine_min"] > 0.9999 and fidelity["label_agreement"] == 1.0
    assert "label agreement 1.0000 (posthoc task head)" in result.output
    result = runner.invoke(main, ["extract", str(base), str(tmp_path / "tuned"), str(tmp_path / "lora1"), "--kind", "lora",
                                  "--rank", "1", "--calib", str(calib), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rank1 = json.loads((tmp_path / "lora1" / "fidelity.json").read_text())
    assert rank1["calibration"]["hidden_cosine_mean"] < fidelity["hidden_cosine_mean"]
    assert 0 < rank1["summary"]["energy kept (whole model)"] < 1


def test_large_matrices_use_a_randomized_svd_as_good_as_the_best(monkeypatch):
    """Above 1024 rows and columns and for small ranks the factors come from a randomized SVD; its error is
    measured (not estimated) and stays within 1 % of the best rank-r error on a decaying spectrum."""
    from posthoc.modules import lowrank

    m, n, r = 1100, 1024, 16
    assert lowrank.uses_randomized((m, n), r)
    assert not lowrank.uses_randomized((m, n), 200) and not lowrank.uses_randomized((1000, 4096), r)
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(m, 64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, 64, generator=g))
    S = 0.9 ** torch.arange(64, dtype=torch.float32)
    phi = (U * S) @ V.T + 1e-4 * torch.randn(m, n, generator=g)
    calls = []
    real = torch.svd_lowrank
    monkeypatch.setattr(torch, "svd_lowrank", lambda *a, **k: calls.append(k) or real(*a, **k))
    B, A, error = lowrank.factor(phi, r)
    assert len(calls) == 1 and B.shape == (m, r) and A.shape == (r, n)
    measured = float((phi.double() - B.double() @ A.double()).norm() / phi.double().norm())
    best = torch.linalg.svdvals(phi.double())
    best = float(best[r:].norm() / best.norm())
    assert error == pytest.approx(measured, rel=1e-4)
    assert best - 1e-6 <= error <= 1.01 * best
