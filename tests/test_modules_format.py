"""The module format: PEFT adapters made elsewhere read exactly, sharded streaming writes, manifests."""
# ruff: noqa: F811  (fixtures imported from modules_common are redefined as test arguments)

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_all
from modules_common import bert_pair, outputs  # noqa: F401  (fixtures)

from posthoc.modules.apply import stack
from posthoc.modules.combine import combine
from posthoc.modules.module import open_module
from posthoc.modules.writer import ModuleWriter


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_peft_adapters_made_elsewhere_apply_exactly(bert_pair, tmp_path, bias):
    """rsLoRA scaling, per-layer ranks and alphas, an embedding LoRA, saved modules and biases: base + the
    adapter as posthoc reads it gives what PEFT itself computes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    base, _ = bert_pair
    torch.manual_seed(1)
    config = LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["query", "value", "word_embeddings", "intermediate.dense"],
        rank_pattern={"value": 2}, alpha_pattern={"layer.1.attention.self.query": 3}, bias=bias,
        modules_to_save=["encoder.layer.0.output.LayerNorm"], init_lora_weights=False,
    )
    model = get_peft_model(AutoModel.from_pretrained(base), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "adapter")
    with open_module(tmp_path / "adapter") as module:
        assert module.kind == "lora" and not module.manifest.base.fingerprint
        assert module.entry("encoder.layer.1.attention.self.query.weight")["scale"] == pytest.approx(3 / 2)  # α/√r
        assert module.rank("encoder.layer.0.attention.self.value.weight") == 2
        assert module.storage("encoder.layer.0.output.LayerNorm.weight") == "absolute"
    result = stack(base, [tmp_path / "adapter"], tmp_path / "stacked", progress=False)
    assert "no base fingerprint" in result.warnings[0]
    torch.testing.assert_close(outputs(tmp_path / "stacked"), outputs(base, tmp_path / "adapter"), atol=1e-5, rtol=0)
    # and it merges like one of ours: Σ with a LoRA of our own, written as a LoRA PEFT loads
    merged = combine(base, [tmp_path / "adapter", tmp_path / "adapter"], [0.5, 0.5], tmp_path / "merged", progress=False)
    assert merged.kind == "lora"
    torch.testing.assert_close(outputs(base, tmp_path / "merged"), outputs(base, tmp_path / "adapter"), atol=1e-5, rtol=0)


def test_writer_streams_shards_and_publishes_atomically(tmp_path):
    tensors = {f"t{i}": torch.full((100, 10), float(i)) for i in range(5)}  # 4 kB each
    with ModuleWriter(tmp_path / "out", shard_size=9000) as writer:
        for name, value in tensors.items():
            writer.write("module", name, value)
        writer.write("adapter_model", "single", torch.arange(3))
        torch.testing.assert_close(writer.read("module", "t3"), tensors["t3"])  # readable before it is published
        assert not (tmp_path / "out").exists()
        writer.add_json("module.json", {"x": 1})
        writer.commit()
    index = json.loads((tmp_path / "out" / "module.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # two tensors per shard
    stored = read_all(tmp_path / "out")
    for name, value in tensors.items():
        torch.testing.assert_close(stored[name], value)
    assert torch.equal(stored["single"], torch.arange(3)) and (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(RuntimeError), ModuleWriter(tmp_path / "failed") as writer:
        writer.write("module", "a", torch.zeros(2))
        raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_public_entry_points_are_the_functions_whatever_was_imported_first():
    import posthoc.cli  # noqa: F401  (imports every command's library module first)

    from posthoc.modules import extract, open_module, stack

    assert all(callable(f) and f.__name__ == n for f, n in [(extract, "extract"), (stack, "stack"), (open_module, "open_module")])
