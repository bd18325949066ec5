"""Bad input to extract / stack / merge of modules: one clear line, exit ≠ 0, nothing written, inputs untouched."""
# ruff: noqa: F811  (fixtures imported from modules_common are redefined as test arguments)

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from modules_common import bert_copy, bert_pair, fails_cleanly, make_pair  # noqa: F401  (fixtures)
from posthoc.cli import main

from posthoc.modules.extraction import extract


@pytest.fixture(scope="module")
def lora_master(bert_pair, tmp_path_factory):
    base, tuned = bert_pair
    out = tmp_path_factory.mktemp("bad_input") / "lora"
    extract(base, tuned[0], out, kind="lora", rank=2, progress=False)
    return out


@pytest.fixture()
def lora(lora_master, tmp_path):
    """A private copy of a LoRA module of the tiny BERT (same bytes as bert_copy's base, so it fits it)."""
    shutil.copytree(lora_master, tmp_path / "lora")
    return tmp_path / "lora"


def test_module_for_another_base_is_refused_naming_both_fingerprints(bert_copy, lora, tmp_path):
    from conftest import tiny_bert_config
    from transformers import BertModel

    base, tuned = bert_copy
    other, _ = make_pair(tmp_path / "other", BertModel, tiny_bert_config(vocab_size=100), n_tuned=0, seed=7)
    manifest = json.loads((lora / "module.json").read_text())
    message = fails_cleanly(tmp_path, ["stack", other, tmp_path / "out", "--module", lora], [other, lora, base],
                            match="module was made for base")
    assert manifest["base"]["fingerprint"] in message and "--allow-base-mismatch" in message
    from posthoc.checkpoint import open_checkpoint
    from posthoc.modules.format import fingerprint

    with open_checkpoint(other) as ckpt:
        assert fingerprint(ckpt) in message
    # merges refuse it too (all modules, or a module next to a checkpoint), saying what to do instead
    for models in ([lora, lora], [lora, tuned[0]]):
        message = fails_cleanly(tmp_path, ["merge", "--method", "task_arithmetic", "--base", other, *models, "-o", tmp_path / "out"],
                                [other, lora, tuned[0]], match="module was made for base")
        assert manifest["base"]["fingerprint"] in message and "with the base it was made for" in message
    # overriding it applies the module, with the same line as a warning
    result = CliRunner().invoke(main, ["stack", str(other), str(tmp_path / "out"), "--module", str(lora),
                                       "--allow-base-mismatch", "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0 and "warning:" in result.stderr and manifest["base"]["fingerprint"] in result.stderr


def test_rank_larger_than_the_matrices_allow(bert_copy, lora, tmp_path):
    base, tuned = bert_copy
    fails_cleanly(tmp_path, ["extract", base, tuned[0], tmp_path / "out", "--kind", "lora", "--rank", "500"], [base, tuned[0]],
                  match="The 'rank' parameter of extract must be at most")
    fails_cleanly(tmp_path, ["merge", "--method", "linear", lora, lora, "-o", tmp_path / "out", "--rank", "500"], [lora],
                  match="The 'rank' parameter of merge must be at most")
    fails_cleanly(tmp_path, ["extract", base, tuned[0], tmp_path / "out", "--kind", "lora", "--rank", "0"], [base, tuned[0]],
                  match="must be an int >= 1. Got 0 instead")


@pytest.mark.parametrize("density", ["0", "1.5", "-0.1", "nan"])
def test_density_outside_zero_one(bert_copy, tmp_path, density):
    base, tuned = bert_copy
    fails_cleanly(tmp_path, ["extract", base, tuned[0], tmp_path / "out", "--kind", "sparse", "--density", density],
                  [base, tuned[0]], match="The 'density' parameter of extract must be a number in (0, 1]")


def test_target_tensor_missing_from_the_base(bert_copy, lora, tmp_path):
    base, tuned = bert_copy
    manifest = json.loads((lora / "module.json").read_text())
    entry = manifest["tensors"].pop("encoder.layer.0.attention.self.query.weight")
    manifest["tensors"]["encoder.layer.9.attention.self.query.weight"] = entry
    (lora / "module.json").write_text(json.dumps(manifest))
    fails_cleanly(tmp_path, ["stack", base, tmp_path / "out", "--module", lora], [base, lora],
                  match="changes tensor 'encoder.layer.9.attention.self.query.weight', which the base")
    # and a fine-tune with a tensor the base lacks cannot be extracted
    from safetensors.torch import load_file, save_file

    tensors = load_file(tuned[1] / "model.safetensors")
    tensors["classifier.weight"] = torch.zeros(3, 32)
    save_file(tensors, tuned[1] / "model.safetensors", metadata={"format": "pt"})
    fails_cleanly(tmp_path, ["extract", base, tuned[1], tmp_path / "out"], [base, tuned[1]],
                  match="tensor classifier.weight of")


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: (d / "module.json").unlink() or (d / "adapter_config.json").unlink(), "no module.json"),
        (lambda d: (d / "module.json").write_text("{not json"), "not valid JSON"),
        (lambda d: _edit(d, lambda m: m.update(kind="adapter")), "field 'kind' is 'adapter'"),
        (lambda d: _edit(d, lambda m: m["tensors"]["encoder.layer.0.attention.self.query.weight"].update(storage="zip")),
         "field 'storage' is 'zip'"),
        (lambda d: _edit(d, lambda m: m["tensors"]["encoder.layer.0.attention.self.query.weight"].pop("shape")),
         "field 'shape' must be a list"),
        (lambda d: _edit(d, lambda m: m["tensors"]["encoder.layer.0.attention.self.query.weight"].update(rank=3)),
         "do not make a rank-3 change"),
        (lambda d: _edit(d, lambda m: m["tensors"]["encoder.layer.0.output.LayerNorm.weight"].update(key="nope")),
         "names tensor 'nope', which is not stored"),
        (lambda d: _edit(d, lambda m: m["base"].pop("fingerprint")), "field 'base.fingerprint' is missing"),
    ],
    ids=["missing", "json", "kind", "storage", "shape", "rank", "stored", "fingerprint"],
)
def test_manifest_missing_or_malformed(bert_copy, lora, tmp_path, damage, match):
    base, _ = bert_copy
    damage(lora)
    fails_cleanly(tmp_path, ["stack", base, tmp_path / "out", "--module", lora], [base, lora], match=match)


def _edit(directory, change) -> None:
    manifest = json.loads((directory / "module.json").read_text())
    change(manifest)
    (directory / "module.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "variant, match",
    [
        ({"use_dora": True}, "use_dora: true"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights: 'pissa'"),
        ({"peft_type": "IA3"}, "peft_type 'IA3'"),
    ],
    ids=["dora", "pissa", "ia3"],
)
def test_unsupported_peft_variants_are_refused(bert_copy, tmp_path, variant, match):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    base, _ = bert_copy
    adapter = tmp_path / "adapter"
    model = get_peft_model(AutoModel.from_pretrained(base), LoraConfig(r=2, target_modules=["query"], use_dora="use_dora" in variant))
    model.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(variant)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    message = fails_cleanly(tmp_path, ["stack", base, tmp_path / "out", "--module", adapter], [base, adapter], match=match)
    assert "cannot represent exactly" in message
    fails_cleanly(tmp_path, ["merge", "--method", "linear", adapter, adapter, "-o", tmp_path / "out"], [base, adapter], match=match)


def test_other_refusals(bert_copy, lora, tmp_path):
    base, tuned = bert_copy
    fails_cleanly(tmp_path, ["stack", base, tmp_path / "out", "--module", lora, "--scale", "1", "--scale", "2"], [base, lora],
                  match="give one --scale per --module (1), got 2")
    fails_cleanly(tmp_path, ["extract", base, base, tmp_path / "out"], [base], match="identical to the base")
    fails_cleanly(tmp_path, ["extract", base, tuned[0], tmp_path / "out", "--kind", "lora", "--density", "0.1"],
                  [base, tuned[0]], match="applies to --kind sparse")
    fails_cleanly(tmp_path, ["stack", lora, tmp_path / "out", "--module", lora], [lora], match="is a module, not a model")
    fails_cleanly(tmp_path, ["stack", base, lora / "inside", "--module", lora], [base, lora], match="is inside the input",
                  out=lora / "inside")
    shutil.copytree(lora, tmp_path / "copy")
    fails_cleanly(tmp_path, ["merge", "--method", "linear", f"{base}+{tmp_path / 'nothing'}", "-o", tmp_path / "out"], [base],
                  match="the part after '+' must be a module")
