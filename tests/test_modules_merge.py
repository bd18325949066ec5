"""Merging modules: LoRA + LoRA exactly, re-factoring to a rank, TIES/DARE on modules, modules next to checkpoints."""
# ruff: noqa: F811  (fixtures imported from modules_common are redefined as test arguments)

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import read_all
from modules_common import bert_pair, best_rank, changes, lora_changes, outputs  # noqa: F401  (fixtures)
from posthoc.cli import main

from posthoc.merge.config import MergeConfig
from posthoc.merge.engine import merge as merge_checkpoints
from posthoc.merge.registry import REGISTRY, PerModel, Required, merge_method
from posthoc.modules import lowrank
from posthoc.modules.apply import stack
from posthoc.modules.extraction import extract


@pytest.fixture(scope="module")
def loras(bert_pair, tmp_path_factory):
    base, tuned = bert_pair
    root = tmp_path_factory.mktemp("merge_modules")
    extract(base, tuned[0], root / "lora0", kind="lora", rank=4, progress=False)
    extract(base, tuned[1], root / "lora1", kind="lora", rank=2, progress=False)
    extract(base, tuned[0], root / "delta0", kind="delta", progress=False)
    extract(base, tuned[1], root / "delta1", kind="delta", progress=False)
    return root


def config(base, models, method="task_arithmetic", **parameters) -> MergeConfig:
    return MergeConfig.from_dict({
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": p} for m, p in models],
        **({"parameters": parameters} if parameters else {}),
    })


def test_refactor_is_the_best_rank_r_with_the_exact_error():
    g = torch.Generator().manual_seed(0)
    Bs = [torch.randn(40, r, generator=g) for r in (3, 5)]
    As = [torch.randn(r, 30, generator=g) for r in (3, 5)]
    exact = (1.5 * Bs[0]).double() @ As[0].double() - (0.7 * Bs[1]).double() @ As[1].double()
    B, A, error = lowrank.refactor([1.5 * Bs[0], -0.7 * Bs[1]], As, rank=4)
    torch.testing.assert_close((B @ A).double(), best_rank(exact, 4), atol=1e-4, rtol=0)
    S = torch.linalg.svdvals(exact)
    assert error == pytest.approx(float(S[4:].norm() / S.norm()), rel=1e-6)
    B, A, error = lowrank.refactor([1.5 * Bs[0], -0.7 * Bs[1]], As, rank=None)  # exact: numerical rank 8
    assert B.shape[1] == 8 and error == 0
    torch.testing.assert_close((B @ A).double(), exact, atol=1e-4, rtol=0)


def test_lora_plus_lora_is_exact_for_any_ranks_and_signs(bert_pair, loras, tmp_path):
    base, _ = bert_pair
    result = merge_checkpoints(config(base, [(loras / "lora0", {"weight": 0.8}), (loras / "lora1", {"weight": -0.3})]),
                               tmp_path / "sum", progress=False)
    assert result.kind == "lora" and result.refactor_error is None
    phi0, phi1, merged = lora_changes(loras / "lora0"), lora_changes(loras / "lora1"), lora_changes(tmp_path / "sum")
    assert set(merged) == set(phi0) | set(phi1)
    for name in merged:  # no cross-terms: Σ wᵢ BᵢAᵢ to float round-off
        torch.testing.assert_close(merged[name], 0.8 * phi0.get(name, 0) - 0.3 * phi1.get(name, 0), atol=1e-6, rtol=0)
    # the norms and biases stored whole are merged with the same weights
    b, d0, d1 = read_all(base), read_all(loras / "lora0"), read_all(loras / "lora1")
    name = "encoder.layer.0.output.LayerNorm.weight"
    assert name in d0 and name in d1
    torch.testing.assert_close(read_all(tmp_path / "sum")[name], 0.8 * d0[name] - 0.3 * d1[name], atol=1e-6, rtol=0)
    # PEFT loads the merged adapter and agrees with our stacked checkpoint
    stack(base, [tmp_path / "sum"], tmp_path / "stacked", progress=False)
    torch.testing.assert_close(outputs(base, tmp_path / "sum"), outputs(tmp_path / "stacked"), atol=1e-5, rtol=0)
    _ = b


def test_lora_merge_to_a_target_rank_through_the_cli(bert_pair, loras, tmp_path):
    base, _ = bert_pair
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump({  # no base_model: the modules' manifests name it
        "merge_method": "linear",
        "models": [{"model": str(loras / "lora0"), "parameters": {"weight": 1.0}},
                   {"model": str(loras / "lora1"), "parameters": {"weight": 1.0}}],
    }))
    result = CliRunner().invoke(main, ["merge", str(path), str(tmp_path / "out"), "--rank", "3", "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "module of kind lora" in result.output
    # linear normalizes: the exact sum is (φ0 + φ1)/2; rank 3 keeps its best rank-3 part
    phi0, phi1, merged = lora_changes(loras / "lora0"), lora_changes(loras / "lora1"), lora_changes(tmp_path / "out")
    fidelity = {r["name"]: r for r in json.loads((tmp_path / "out" / "fidelity.json").read_text())["tensors"]}
    for name in merged:
        exact = 0.5 * (phi0.get(name, 0) + phi1.get(name, 0))
        torch.testing.assert_close(merged[name], best_rank(exact, 3), atol=1e-5, rtol=0)
        S = torch.linalg.svdvals(exact)
        assert fidelity[name]["relative_error"] == pytest.approx(float(S[3:].norm() / S.norm()), abs=1e-5)


def test_ties_on_modules_matches_ties_on_their_checkpoints(bert_pair, loras, tmp_path):
    base, tuned = bert_pair
    params = {"weight": 1.0, "density": 0.3}
    as_modules = merge_checkpoints(config(base, [(loras / "delta0", params), (loras / "delta1", params)], "ties", **{"lambda": 0.9}),
                                   tmp_path / "mod", progress=False)
    assert as_modules.kind == "delta"
    as_checkpoints = merge_checkpoints(config(base, [(tuned[0], params), (tuned[1], params)], "ties", **{"lambda": 0.9}),
                                       tmp_path / "ckpt", progress=False)
    stack(base, [as_modules.out_dir], tmp_path / "stacked", progress=False)
    reference = read_all(as_checkpoints.out_dir)
    for name, value in read_all(tmp_path / "stacked").items():
        torch.testing.assert_close(value, reference[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["dare_linear", "ties"])
def test_ties_and_dare_on_loras_form_the_change_and_report_the_refactoring(bert_pair, loras, tmp_path, method):
    base, _ = bert_pair
    params = {"weight": 1.0, "density": 0.5}
    result = merge_checkpoints(config(base, [(loras / "lora0", params), (loras / "lora1", params)], method),
                               tmp_path / "out", seed=3, progress=False)
    assert result.kind == "lora" and 0 < result.refactor_error < 1
    records = json.loads((tmp_path / "out" / "fidelity.json").read_text())["tensors"]
    assert any(r["how"].startswith("formed per tensor") for r in records)
    # the same seed draws the same masks as the engine does on the applied checkpoints
    reference = merge_checkpoints(config(base, [(f"{base}+{loras / 'lora0'}", params), (f"{base}+{loras / 'lora1'}", params)],
                                         method), tmp_path / "ref", seed=3, progress=False)
    name = "encoder.layer.1.attention.self.value.weight"
    record = next(r for r in records if r["name"] == name)
    exact = read_all(reference.out_dir)[name].double() - read_all(base)[name].double()
    merged = lora_changes(tmp_path / "out")[name]
    assert float((merged - exact).norm() / exact.norm()) == pytest.approx(record["relative_error"], abs=1e-4)


def test_modules_next_to_checkpoints_merge_into_a_checkpoint(bert_pair, loras, tmp_path):
    base, tuned = bert_pair
    result = merge_checkpoints(config(base, [(tuned[1], {"weight": 0.5}), (loras / "delta0", {"weight": 0.5})]),
                               tmp_path / "out", progress=False)
    assert not hasattr(result, "kind")  # a checkpoint, merged by the engine
    b, phi0, phi1 = read_all(base), changes(base, tuned[0]), changes(base, tuned[1])
    for name, value in read_all(tmp_path / "out").items():
        if name in phi0:
            torch.testing.assert_close(value.double(), b[name].double() + 0.5 * phi0[name] + 0.5 * phi1[name], atol=1e-6, rtol=0)
    from transformers import AutoModel

    AutoModel.from_pretrained(tmp_path / "out")


def test_slerp_of_a_module_needs_and_uses_the_base(bert_pair, loras, tmp_path):
    base, tuned = bert_pair
    result = merge_checkpoints(config(base, [(loras / "delta0", {})], "slerp", t=0.3), tmp_path / "mod", progress=False)
    reference = merge_checkpoints(config(base, [(tuned[0], {})], "slerp", t=0.3), tmp_path / "ckpt", progress=False)
    stack(base, [result.out_dir], tmp_path / "stacked", progress=False)
    ref = read_all(reference.out_dir)
    for name, value in read_all(tmp_path / "stacked").items():
        torch.testing.assert_close(value, ref[name], atol=1e-6, rtol=0)


def test_a_method_that_declares_nothing_is_run_on_the_base_plus_the_changes(bert_pair, loras, tmp_path):
    """The module path goes by what the registry declares, not by what a function computes: a weighted sum of
    task vectors that declares neither `linear` nor `on_task_vectors` is evaluated on θ₀ + φᵢ with the real
    base, for every float tensor of the base (never on unit inputs, never over a zero base)."""
    base, tuned = bert_pair
    bases_seen = []

    def undeclared_sum(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: PerModel = Required) -> torch.Tensor:
        """θ₀ + Σ wᵢ(θᵢ − θ₀), declared as nothing in particular (a test method)."""
        bases_seen.append(base.clone())
        return base + sum(w * (t - base) for w, t in zip(weight, tensors))

    merge_method("undeclared_sum", base="required", paper="https://example.org/undeclared")(undeclared_sum)
    try:
        result = merge_checkpoints(
            config(base, [(loras / "delta0", {"weight": 0.8}), (loras / "delta1", {"weight": -0.3})], "undeclared_sum"),
            tmp_path / "out", progress=False,
        )
    finally:
        REGISTRY.pop("undeclared_sum")
    b = {n: t for n, t in read_all(base).items() if t.dtype.is_floating_point}
    assert len(bases_seen) == len(b)
    assert all(any(seen.shape == t.shape and torch.equal(seen, t.float()) for t in b.values()) for seen in bases_seen)
    assert result.kind == "delta"
    stack(base, [result.out_dir], tmp_path / "stacked", progress=False)
    phi0, phi1 = changes(base, tuned[0]), changes(base, tuned[1])
    for name, value in read_all(tmp_path / "stacked").items():
        if name in phi0:
            torch.testing.assert_close(value.double(), b[name].double() + 0.8 * phi0[name] - 0.3 * phi1[name],
                                       atol=1e-5, rtol=0)
