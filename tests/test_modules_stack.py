"""`posthoc stack`: θ₀ + Σ sᵢφᵢ into a checkpoint transformers loads, or one combined module."""
# ruff: noqa: F811  (fixtures imported from modules_common are redefined as test arguments)

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import read_all
from modules_common import bert_pair, changes, lora_changes, outputs  # noqa: F401  (fixtures)
from posthoc.cli import main

from posthoc.checkpoint import open_checkpoint
from posthoc.modules.apply import open_applied, stack
from posthoc.modules.extraction import extract
from posthoc.modules.module import open_module


@pytest.fixture(scope="module")
def modules(bert_pair, tmp_path_factory):
    """A delta module of each fine-tune, a sparse one and two LoRAs of different ranks."""
    base, tuned = bert_pair
    root = tmp_path_factory.mktemp("stack_modules")
    extract(base, tuned[0], root / "delta0", kind="delta", progress=False)
    extract(base, tuned[1], root / "delta1", kind="delta", progress=False)
    extract(base, tuned[1], root / "sparse1", kind="sparse", density=0.2, progress=False)
    extract(base, tuned[0], root / "lora0", kind="lora", rank=3, progress=False)
    extract(base, tuned[1], root / "lora1", kind="lora", rank=2, progress=False)
    return root


def test_stack_is_base_plus_scaled_changes(bert_pair, modules, tmp_path):
    base, tuned = bert_pair
    result = CliRunner().invoke(main, ["stack", str(base), str(tmp_path / "out"), "--module", str(modules / "delta0"),
                                       "--module", str(modules / "delta1"), "--scale", "0.5", "--scale", "-0.25", "--quiet"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    b, phi0, phi1 = read_all(base), changes(base, tuned[0]), changes(base, tuned[1])
    out = read_all(tmp_path / "out")
    assert set(out) == set(b)
    for name, value in out.items():
        assert value.dtype == b[name].dtype and value.shape == b[name].shape
        expected = b[name].double() + 0.5 * phi0.get(name, 0) - 0.25 * phi1.get(name, 0)
        torch.testing.assert_close(value.double(), expected, atol=1e-6, rtol=0)
    from transformers import AutoModel

    AutoModel.from_pretrained(tmp_path / "out")  # loads with the base's config and tokenizer files
    record = json.loads((tmp_path / "out" / "posthoc_stack.json").read_text())
    assert [m["scale"] for m in record["modules"]] == [0.5, -0.25]


def test_stack_delta_reproduces_the_finetune(bert_pair, modules, tmp_path):
    base, tuned = bert_pair
    stack(base, [modules / "delta0"], tmp_path / "out", progress=False)
    torch.testing.assert_close(outputs(tmp_path / "out"), outputs(tuned[0]), atol=1e-5, rtol=0)


def test_mixed_kinds_and_lazy_rows(bert_pair, modules):
    base, _ = bert_pair
    name = "embeddings.word_embeddings.weight"
    with open_applied(base, [modules / "sparse1", modules / "lora0"], [1.0, 2.0]) as applied, \
            open_module(modules / "sparse1") as sparse, open_module(modules / "lora0") as lora, open_checkpoint(base) as b:
        whole = applied.read(name)
        expected = b.read(name) + sparse.delta(name) + 2 * lora.delta(name)
        torch.testing.assert_close(whole, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(applied.read(name, slice(10, 37)), whole[10:37])  # rows read lazily
        indices, values = sparse.sparse(name)
        dense = torch.zeros(b.tensors[name].numel)
        dense[indices] = values
        torch.testing.assert_close(sparse.delta(name, rows=slice(5, 9)).reshape(-1), dense.reshape(whole.shape)[5:9].reshape(-1))


def test_as_module_lora_is_exact_and_loads_in_peft(bert_pair, modules, tmp_path):
    base, _ = bert_pair
    result = stack(base, [modules / "lora0", modules / "lora1"], tmp_path / "sum", scales=[1.0, -0.5], as_module=True,
                   progress=False)
    assert result.kind == "lora" and result.refactor_error is None
    exact = {n: lora_changes(modules / "lora0").get(n, 0) - 0.5 * lora_changes(modules / "lora1").get(n, 0)
             for n in lora_changes(modules / "lora0")}
    merged = lora_changes(tmp_path / "sum")
    for name, value in exact.items():
        torch.testing.assert_close(merged[name], value, atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "sum" / "module.json").read_text())["tensors"][
        "encoder.layer.0.attention.self.query.weight"]["rank"] == 5  # 3 + 2, concatenated
    stack(base, [modules / "lora0", modules / "lora1"], tmp_path / "stacked", scales=[1.0, -0.5], progress=False)
    torch.testing.assert_close(outputs(base, tmp_path / "sum"), outputs(tmp_path / "stacked"), atol=1e-5, rtol=0)


def test_as_module_mixed_kinds_is_a_delta(bert_pair, modules, tmp_path):
    base, _ = bert_pair
    result = stack(base, [modules / "sparse1", modules / "lora0"], tmp_path / "sum", as_module=True, progress=False)
    assert result.kind == "delta"
    stack(base, [tmp_path / "sum"], tmp_path / "a", progress=False)
    stack(base, [modules / "sparse1", modules / "lora0"], tmp_path / "b", progress=False)
    for name, value in read_all(tmp_path / "a").items():
        torch.testing.assert_close(value, read_all(tmp_path / "b")[name], atol=1e-6, rtol=0)

