"""The checkpoint I/O layer: lazy listing, one-tensor reads, every input format, the atomic streaming writer."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import read_all
from safetensors.torch import load_file, save_file

from posthoc import checkpoint as ckpt_io
from posthoc.checkpoint import CheckpointWriter, TensorSpec, open_checkpoint
from posthoc.errors import CheckpointError, OutputError


def test_listing_reads_no_tensor_data(llama_family_sharded_bf16, monkeypatch):
    base, _ = llama_family_sharded_bf16
    reads = []
    real_preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda *a: reads.append(a) or real_preadv(*a))
    with open_checkpoint(base) as ckpt:
        assert len(ckpt.tensors) == 30 and ckpt.architecture == "LlamaForCausalLM"
        info = ckpt.tensors["model.layers.2.mlp.down_proj.weight"]
        assert info.shape == (32, 64) and info.dtype == torch.bfloat16 and info.nbytes == 32 * 64 * 2
        assert len({i.file for i in ckpt.tensors.values()}) > 1  # really sharded
        assert reads == []
        tensor = ckpt.read("model.layers.2.mlp.down_proj.weight")
        assert len(reads) == 1
    assert torch.equal(tensor, read_all(base)["model.layers.2.mlp.down_proj.weight"])


def test_read_rows(llama_family):
    base, _ = llama_family
    with open_checkpoint(base) as ckpt:
        whole = ckpt.read("model.embed_tokens.weight")
        torch.testing.assert_close(ckpt.read("model.embed_tokens.weight", slice(5, 17)), whole[5:17])


def test_mapped_reads_equal_reads_and_never_write_the_file(llama_family, tmp_path):
    base, _ = llama_family
    copy = tmp_path / "model"
    copy.mkdir()
    for file in base.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    weights = copy / "model.safetensors"
    before = weights.read_bytes()
    with open_checkpoint(copy) as ckpt:
        for name in ckpt.tensors:
            assert torch.equal(ckpt.read_mapped(name), ckpt.read(name))
        name = "model.embed_tokens.weight"
        rows = ckpt.read_mapped(name, slice(5, 17))
        assert torch.equal(rows, ckpt.read(name)[5:17])
        rows.fill_(7.0)  # copy-on-write: neither the file nor a later read sees it
        assert torch.equal(ckpt.read_mapped(name, slice(5, 17)), ckpt.read(name)[5:17])
        assert not torch.equal(rows, ckpt.read(name)[5:17])
        assert weights.read_bytes() == before
        os.truncate(weights, len(before) - 100)  # cut under an open checkpoint: an error, not a crash
        with pytest.raises(CheckpointError, match="truncated"):
            ckpt.read_mapped(list(ckpt.tensors)[-1])


def test_single_safetensors_file_and_pickled_bin_shards(llama_family, tmp_path):
    base, _ = llama_family
    state = load_file(base / "model.safetensors")
    single = open_checkpoint(base / "model.safetensors")
    assert set(single.tensors) == set(state)
    # A sharded pytorch_model.bin, as older hub repositories have.
    names = sorted(state)
    half = len(names) // 2
    torch.save({n: state[n] for n in names[:half]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({n: state[n] for n in names[half:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {n: f"pytorch_model-0000{1 if i < half else 2}-of-00002.bin" for i, n in enumerate(names)}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with open_checkpoint(tmp_path) as ckpt:
        assert set(ckpt.tensors) == set(state)
        assert torch.equal(ckpt.read(names[-1]), state[names[-1]])


def test_index_naming_a_missing_shard(llama_family_sharded_bf16, tmp_path):
    import shutil

    base, _ = llama_family_sharded_bf16
    shutil.copytree(base, tmp_path / "m")
    next(iter(sorted((tmp_path / "m").glob("model-*.safetensors")))).unlink()
    with pytest.raises(CheckpointError, match="lists model-00001-of-.*which is missing"):
        open_checkpoint(tmp_path / "m")


def test_writer_streams_in_any_order_into_shards(tmp_path):
    tensors = {f"t{i}": torch.randn(100, 10 + i) for i in range(8)}
    tensors["ids"] = torch.arange(7)
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    with CheckpointWriter(tmp_path / "out", specs, shard_size=10_000) as writer:
        assert not (tmp_path / "out").exists()
        for name in reversed(list(tensors)):
            writer.write(name, tensors[name])
        writer.add_json("config.json", {"a": 1})
        writer.commit()
    files = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 3 and all(f.stat().st_size < 10_000 + 1024 for f in files)
    assert files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
    out = read_all(tmp_path / "out")
    assert all(torch.equal(out[n], t) for n, t in tensors.items())
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_writer_refuses_what_is_not_planned(tmp_path):
    specs = [TensorSpec("a", (2, 2), torch.float32), TensorSpec("b", (3,), torch.float32)]
    with CheckpointWriter(tmp_path / "out", specs) as writer:
        with pytest.raises(OutputError, match="not in the output plan"):
            writer.write("c", torch.zeros(2))
        with pytest.raises(OutputError, match=r"planned \[2, 2\] torch.float32, got \[4\]"):
            writer.write("a", torch.zeros(4))
        writer.write("a", torch.zeros(2, 2))
        with pytest.raises(OutputError, match="written twice"):
            writer.write("a", torch.zeros(2, 2))
        with pytest.raises(OutputError, match="never written, e.g. 'b'"):
            writer.commit()
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_force_replaces_an_existing_output_atomically(tmp_path):
    save_file({"x": torch.ones(2)}, tmp_path / "placeholder.safetensors")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(OutputError, match="already exists"):
        CheckpointWriter(tmp_path / "out", [TensorSpec("x", (1,), torch.float32)])
    ckpt_io.save_state_dict({"x": torch.ones(1)}, tmp_path / "out", force=True)
    assert not (tmp_path / "out" / "old.txt").exists() and (tmp_path / "out" / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".out.*"))


@pytest.mark.real
def test_gguf_input_merges_into_a_loadable_checkpoint(tmp_path):
    """SmolLM2-135M ships as a 4-bit GGUF: transformers dequantises it once, then it streams like any input."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posthoc.assets import smollm2_gguf
    from posthoc.merge.config import MergeConfig
    from posthoc.merge.engine import merge as merge_checkpoints

    gguf = smollm2_gguf()
    with open_checkpoint(gguf) as ckpt:
        assert ckpt.architecture == "LlamaForCausalLM" and ckpt.source == str(gguf)
        assert ckpt.config["num_hidden_layers"] == 30 and "lm_head.weight" not in ckpt.tensors  # tied
        state = {n: ckpt.read(n) for n in ckpt.tensors}
        directory = ckpt.directory
    generator = torch.Generator().manual_seed(0)
    noisy = {n: t + 1e-3 * torch.randn(t.shape, generator=generator) for n, t in state.items()}
    tuned = ckpt_io.save_state_dict(noisy, tmp_path / "tuned", copy_from=directory)
    config = MergeConfig.from_dict(
        {"merge_method": "slerp", "base_model": str(gguf), "models": [{"model": str(tuned)}],
         "parameters": {"t": 0.5}, "out_dtype": "bfloat16"}
    )
    merge_checkpoints(config, tmp_path / "out", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16
    ids = tokenizer("The capital of France is", return_tensors="pt")
    text = tokenizer.decode(model.generate(**ids, max_new_tokens=4, do_sample=False)[0])
    assert "Paris" in text


def test_check_command_closes_every_checkpoint_it_opens(llama_family, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from posthoc.cli import main

    base, tuned = llama_family
    closed = []
    close = ckpt_io.Checkpoint.close
    monkeypatch.setattr(ckpt_io.Checkpoint, "close", lambda self: closed.append(self.source) or close(self))
    result = CliRunner().invoke(main, ["check", str(base), *map(str, tuned)])
    assert result.exit_code == 0, result.output
    assert sorted(closed) == sorted(map(str, [base, *tuned]))
    closed.clear()
    result = CliRunner().invoke(main, ["check", str(base), str(tuned[0]), str(tmp_path / "missing")])
    assert result.exit_code == 2 and "missing" in result.output  # one failed to open: those before are closed
    assert sorted(closed) == sorted(map(str, [base, tuned[0]]))
