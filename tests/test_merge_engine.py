"""End-to-end merges on tiny random Llama and BERT checkpoints: outputs checked tensor by tensor against
formulas applied to the inputs read with the safetensors library, and loaded with transformers."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import read_all
from posthoc.cli import main
from test_merge_methods import numpy_ties

from posthoc.errors import ConfigError
from posthoc.merge.config import MergeConfig
from posthoc.merge.engine import merge as merge_checkpoints


def run_cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_ties_yaml_matches_formula_and_loads(llama_family, tmp_path):
    from transformers import AutoModelForCausalLM

    base, tuned = llama_family
    config = write_yaml(
        tmp_path / "ties.yml",
        {
            "merge_method": "ties",
            "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"weight": w, "density": 0.3}} for p, w in zip(tuned, [0.5, 1.0, 0.7])],
            "parameters": {"lambda": 0.9},
        },
    )
    result = run_cli("merge", config, tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    out = read_all(tmp_path / "out")
    inputs = [read_all(base)] + [read_all(p) for p in tuned]
    assert set(out) == set(inputs[0])
    for name in ("model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        expected = numpy_ties(inputs[0][name], [t[name] for t in inputs[1:]], [0.5, 1.0, 0.7], [0.3] * 3, lam=0.9)
        torch.testing.assert_close(out[name], expected, atol=1e-6, rtol=1e-5)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()
    provenance = json.loads((tmp_path / "out" / "posthoc_merge.json").read_text())
    assert provenance["method"] == "ties" and provenance["config"]["parameters"] == {"lambda": 0.9}
    assert (tmp_path / "out" / "posthoc_merge.yml").read_text() == config.read_text()


def test_sharded_bf16_linear_writes_sharded_output(llama_family_sharded_bf16, tmp_path):
    from transformers import AutoModelForCausalLM

    base, tuned = llama_family_sharded_bf16
    assert (base / "model.safetensors.index.json").is_file()  # the inputs really are sharded
    result = run_cli(
        "merge", "--method", "linear", base, *tuned, "--weight", "1", "--weight", "2", "--weight", "1", "--weight", "4",
        "-o", tmp_path / "out", "--shard-size", "8KB", "--quiet",
    )
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 3 and set(index["weight_map"].values()) == set(shards)
    out = read_all(tmp_path / "out")
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    inputs = [read_all(p) for p in [base, *tuned]]
    weights = [1, 2, 1, 4]
    for name, tensor in out.items():
        expected = sum(w * t[name].float() for w, t in zip(weights, inputs)) / sum(weights)
        assert tensor.dtype == torch.bfloat16
        torch.testing.assert_close(tensor, expected.bfloat16(), atol=0, rtol=0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16


def test_gradients_and_filters(llama_family, tmp_path):
    base, tuned = llama_family
    data = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(tuned[0]), "parameters": {"weight": [0.0, 1.0]}}],
    }
    merge_checkpoints(MergeConfig.from_dict(data), tmp_path / "gradient", progress=False)
    out, b, t = read_all(tmp_path / "gradient"), read_all(base), read_all(tuned[0])
    name = "model.layers.{}.self_attn.q_proj.weight"
    torch.testing.assert_close(out[name.format(0)], b[name.format(0)])  # position 0 -> weight 0
    torch.testing.assert_close(out[name.format(1)], (b[name.format(1)] + t[name.format(1)]) / 2)  # 0.5
    torch.testing.assert_close(out[name.format(2)], t[name.format(2)])  # position 1 -> weight 1
    torch.testing.assert_close(out["model.embed_tokens.weight"], b["model.embed_tokens.weight"])  # outside layers: 0

    data["models"][0]["parameters"]["weight"] = [{"filter": "mlp", "value": 1.0}, {"value": 0.0}]
    merge_checkpoints(MergeConfig.from_dict(data), tmp_path / "filter", progress=False)
    out = read_all(tmp_path / "filter")
    for key in out:
        torch.testing.assert_close(out[key], t[key] if "mlp" in key else b[key])


def test_flag_form_equals_yaml(llama_family, tmp_path):
    base, tuned = llama_family
    yaml_path = write_yaml(
        tmp_path / "c.yml",
        {
            "merge_method": "dare_ties",
            "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in tuned[:2]],
            "parameters": {"density": 0.4},
        },
    )
    assert run_cli("merge", yaml_path, tmp_path / "a", "--seed", "3", "--quiet").exit_code == 0
    flags = run_cli("merge", "--method", "dare_ties", "--base", base, *tuned[:2], "--density", "0.4", "--seed", "3",
                    "-o", tmp_path / "b", "--quiet")
    assert flags.exit_code == 0, flags.output
    a, b = read_all(tmp_path / "a"), read_all(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = run_cli("merge", yaml_path, tmp_path / "c", "--seed", "4", "--quiet")
    assert c.exit_code == 0 and not all(torch.equal(a[k], read_all(tmp_path / "c")[k]) for k in a)
    assert json.loads((tmp_path / "a" / "posthoc_merge.json").read_text())["seed"] == 3


def test_config_from_flags_is_the_yaml_it_stands_for():
    flags = MergeConfig.from_flags("ties", "b", ("m1", "m2"), (1.0, 0.5), {"density": 0.2, "lambda": 0.8},
                                   dtype="bfloat16", out_dtype="float32")
    assert flags == MergeConfig.from_dict({
        "merge_method": "ties", "base_model": "b",
        "models": [{"model": "m1", "parameters": {"weight": 1.0}}, {"model": "m2", "parameters": {"weight": 0.5}}],
        "parameters": {"density": 0.2, "lambda": 0.8}, "dtype": "bfloat16", "out_dtype": "float32",
    })
    assert flags.dtype == torch.bfloat16 and flags.out_dtype == torch.float32
    one = MergeConfig.from_flags("linear", None, ["a", "b", "c"], [2.0])  # one weight for every model
    assert [m.parameters for m in one.models] == [{"weight": 2.0}] * 3 and one.base_model is None
    default = MergeConfig.from_flags("task_arithmetic", "b", ["a"])
    assert default.models[0].parameters == {"weight": 1.0} and default.parameters == {}
    slerp = MergeConfig.from_flags("slerp", "b", ["a"], (), {"t": 0.3})  # no `weight` parameter: none given
    assert slerp.models[0].parameters == {} and slerp.parameters == {"t": 0.3}
    with pytest.raises(ConfigError, match=r"^give one --weight for all models or one per model \(3\), got 2$"):
        MergeConfig.from_flags("linear", None, ["a", "b", "c"], [1.0, 2.0])
    with pytest.raises(ConfigError, match="unknown merge method 'tie'; valid methods: .*ties"):
        MergeConfig.from_flags("tie", "b", ["a"])
    with pytest.raises(ConfigError, match="^flags: slerp needs parameter 't'$"):
        MergeConfig.from_flags("slerp", "b", ["a"])
    with pytest.raises(ConfigError, match="^flags: .*dtype"):
        MergeConfig.from_flags("linear", None, ["a"], dtype="float7")


def test_key_value_options_share_one_parser(tmp_path):
    """merge --set, recipe run --set (YAML values) and extract --tag (text) read KEY=VALUE the same way."""
    from posthoc.cli.main import parse_assignment

    assert parse_assignment(" lambda = 0.8") == ("lambda", 0.8)
    assert parse_assignment("languages=[de, fr]") == ("languages", ["de", "fr"])
    assert parse_assignment("normalize=false") == ("normalize", False)
    assert parse_assignment("a=b=c") == ("a", "b=c")
    assert parse_assignment("x=") == ("x", "") and parse_assignment("x=[1,") == ("x", "[1,")  # not YAML: text
    assert parse_assignment(" task = news ", as_text=True) == ("task", "news")
    assert parse_assignment("steps=3", as_text=True) == ("steps", "3")
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_assignment("nope")
    out = tmp_path / "out"
    for args, example in (
        (["merge", "--method", "ties", "--set", "nope", "-o", out, "m"], ""),
        (["extract", "b", "t", out, "--tag", "nope"], " (e.g. task=news)"),
        (["recipe", "run", "r.yaml", "--set", "nope"], ""),
    ):
        result = run_cli(*args)
        assert result.exit_code == 2 and f"expected KEY=VALUE{example}, got 'nope'" in result.output, result.output
    assert not out.exists()


def test_random_method_without_seed_records_the_seed_it_drew(llama_family, tmp_path):
    base, tuned = llama_family
    config = MergeConfig.from_dict(
        {"merge_method": "dare_linear", "base_model": str(base),
         "models": [{"model": str(tuned[0]), "parameters": {"weight": 1.0, "density": 0.5}}]}
    )
    first = merge_checkpoints(config, tmp_path / "a", progress=False)
    merge_checkpoints(config, tmp_path / "b", progress=False, seed=first.seed)
    a, b = read_all(tmp_path / "a"), read_all(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties"])
def test_inputs_read_lazily_by_rows_give_the_same_result(llama_family, tmp_path, method, monkeypatch):
    """Large inputs stay on disk and are read chunk by chunk; forcing that on every tensor (and tiny
    chunks) must not change a single bit."""
    from posthoc import sparsify

    base, tuned = llama_family
    per_model = {"weight": 0.3} | ({"density": 0.3} if method != "linear" and method != "task_arithmetic" else {})
    models = [{"model": str(p), "parameters": per_model} for p in tuned]
    base_entry = {"models": [{"model": str(base), "parameters": per_model}, *models]} if method == "linear" else {
        "base_model": str(base), "models": models}
    config = MergeConfig.from_dict({"merge_method": method, **base_entry})
    merge_checkpoints(config, tmp_path / "whole", progress=False, seed=1)
    monkeypatch.setattr(sparsify, "CHUNK_ELEMENTS", 100)
    monkeypatch.setattr(sparsify, "WHOLE_ELEMENTS", 0)
    monkeypatch.setattr(sparsify, "SLICE_ELEMENTS", 37)  # slices that cut rows
    merge_checkpoints(config, tmp_path / "lazy", progress=False, seed=1, lazy_bytes=0)
    whole, lazy = read_all(tmp_path / "whole"), read_all(tmp_path / "lazy")
    assert all(torch.equal(whole[k], lazy[k]) for k in whole)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
def test_tensors_merged_in_parallel_write_the_same_bytes(llama_family, tmp_path, method, monkeypatch):
    """Several tensors are merged at once (within a byte budget; one above it runs alone): the files written
    must not depend on the number of workers or on the order in which they finish."""
    from posthoc.merge import engine

    base, tuned = llama_family
    per_model = {"weight": 0.4} | ({"density": 0.3} if method != "task_arithmetic" else {})
    config = MergeConfig.from_dict(
        {"merge_method": method, "base_model": str(base), "models": [{"model": str(p), "parameters": per_model} for p in tuned]}
    )
    merge_checkpoints(config, tmp_path / "one", progress=False, seed=2, threads=1)
    merge_checkpoints(config, tmp_path / "four", progress=False, seed=2, threads=4)
    monkeypatch.setattr(engine, "IN_FLIGHT_BYTES", 1)  # every tensor is over budget: one at a time, 4 workers
    merge_checkpoints(config, tmp_path / "alone", progress=False, seed=2, threads=4)
    weights = sorted(p.name for p in (tmp_path / "one").glob("*.safetensors"))
    assert weights
    for name in weights:
        reference = (tmp_path / "one" / name).read_bytes()
        assert (tmp_path / "four" / name).read_bytes() == reference
        assert (tmp_path / "alone" / name).read_bytes() == reference
    assert engine.split_threads(2) == (2, 1) and engine.split_threads(1) == (1, 1) and engine.split_threads(16) == (4, 4)


def test_slerp_read_lazily_by_rows_matches_whole(llama_family, tmp_path, monkeypatch):
    from posthoc import sparsify

    base, tuned = llama_family
    config = MergeConfig.from_dict(
        {"merge_method": "slerp", "base_model": str(base), "models": [{"model": str(tuned[0])}], "parameters": {"t": 0.3}}
    )
    merge_checkpoints(config, tmp_path / "whole", progress=False)
    monkeypatch.setattr(sparsify, "CHUNK_ELEMENTS", 100)
    monkeypatch.setattr(sparsify, "WHOLE_ELEMENTS", 0)
    merge_checkpoints(config, tmp_path / "lazy", progress=False, lazy_bytes=0)
    whole, lazy = read_all(tmp_path / "whole"), read_all(tmp_path / "lazy")
    for name in whole:  # the dot product is summed in another order: equal up to one rounding of the output
        torch.testing.assert_close(lazy[name].float(), whole[name].float(), atol=1e-6, rtol=1e-2)


@pytest.mark.parametrize("method,extra", [("slerp", {"t": 0.4}), ("model_stock", {}), ("multislerp", None), ("della", None)])
def test_bert_merges_load_with_automodel(bert_family, tmp_path, method, extra):
    from transformers import AutoModel

    base, tuned = bert_family
    models = tuned[:1] if method == "slerp" else tuned
    per_model = {"weight": 1.0} if extra is None else {}
    if method == "della":
        per_model["density"] = 0.5
    config = MergeConfig.from_dict(
        {"merge_method": method, "base_model": str(base),
         "models": [{"model": str(p), **({"parameters": per_model} if per_model else {})} for p in models],
         **({"parameters": extra} if extra else {})}
    )
    merge_checkpoints(config, tmp_path / "out", progress=False, seed=0)
    model = AutoModel.from_pretrained(tmp_path / "out")
    hidden = model(torch.tensor([[1, 5, 7]])).last_hidden_state
    assert hidden.shape == (1, 3, 32) and torch.isfinite(hidden).all()


def test_check_command_reports_and_exits(llama_family, bert_family, tmp_path):
    base, tuned = llama_family
    ok = run_cli("check", base, *tuned)
    assert ok.exit_code == 0 and "compatible" in ok.output and "LlamaForCausalLM" in ok.output
    bad = run_cli("check", base, bert_family[0])
    assert bad.exit_code == 1 and "NOT compatible" in bad.output and "missing" in bad.output


@pytest.mark.real
def test_real_minilm_ties_merge(tmp_path):
    """The packaged all-MiniLM-L6-v2 with two perturbed copies: formula check and a sentence embedding."""
    from transformers import AutoModel, AutoTokenizer

    from posthoc.assets import minilm_dir
    from posthoc.checkpoint import open_checkpoint, save_state_dict

    base = minilm_dir()
    with open_checkpoint(base) as ckpt:
        state = {name: ckpt.read(name) for name in ckpt.tensors}
    tuned = []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        noisy = {k: v + 1e-3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}
        tuned.append(save_state_dict(noisy, tmp_path / f"t{i}", copy_from=base))
    config = MergeConfig.from_dict(
        {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.2},
         "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in tuned]}
    )
    merge_checkpoints(config, tmp_path / "out", progress=False)
    out, inputs = read_all(tmp_path / "out"), [read_all(base), *map(read_all, tuned)]
    name = "encoder.layer.3.intermediate.dense.weight"
    expected = numpy_ties(inputs[0][name], [t[name] for t in inputs[1:]], [0.5, 0.5], [0.2, 0.2])
    torch.testing.assert_close(out[name], expected, atol=1e-6, rtol=1e-5)
    model, tokenizer = AutoModel.from_pretrained(tmp_path / "out"), AutoTokenizer.from_pretrained(tmp_path / "out")
    original = AutoModel.from_pretrained(base)
    batch = tokenizer(["posthoc merges checkpoints"], return_tensors="pt")
    a = model(**batch).last_hidden_state.mean(1)
    b = original(**batch).last_hidden_state.mean(1)
    assert torch.nn.functional.cosine_similarity(a, b).item() > 0.99


def _save_tokenizer(directory, tokens):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=tokens[0]).save_pretrained(directory)


def test_vocabulary_alignment_by_token(tmp_path):
    """Models with different vocabularies merge over the base's tokenizer, rows matched by token string."""
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    words = ["<unk>"] + [f"w{i}" for i in range(63)]
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(vocab_size=64))
    base.save_pretrained(tmp_path / "base")
    _save_tokenizer(tmp_path / "base", words)
    # The other model knows two more words and stores its rows in reverse order.
    other_words = list(reversed(words)) + ["new0", "new1"]
    other = LlamaForCausalLM(tiny_llama_config(vocab_size=66))
    other.save_pretrained(tmp_path / "other")
    _save_tokenizer(tmp_path / "other", other_words)

    data = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
            "models": [{"model": str(tmp_path / "other"), "parameters": {"weight": 0.5}}]}
    with pytest.raises(Exception, match="vocabulary sizes differ.*64 rows.*66"):
        merge_checkpoints(MergeConfig.from_dict(data), tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()

    merge_checkpoints(MergeConfig.from_dict({**data, "tokenizer": {"source": "base"}}), tmp_path / "out", progress=False)
    out, b, o = read_all(tmp_path / "out"), read_all(tmp_path / "base"), read_all(tmp_path / "other")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[name].shape == (64, 32)
        for token_id in (0, 5, 63):
            other_row = o[name][other_words.index(words[token_id])]
            expected = b[name][token_id] + 0.5 * (other_row - b[name][token_id])
            torch.testing.assert_close(out[name][token_id], expected)
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(out[name], b[name] + 0.5 * (o[name] - b[name]))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 64
    assert json.loads((tmp_path / "out" / "tokenizer.json").read_text())["model"]["vocab"]["w4"] == 5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_check_sees_every_nan_and_inf_and_no_false_alarm(dtype):
    from posthoc.merge.engine import all_finite

    big = torch.full((3_000_000,), torch.finfo(dtype).max / 2, dtype=dtype)  # its sum overflows: all finite still
    assert all_finite(big) and all_finite(torch.zeros(0, dtype=dtype)) and all_finite(torch.arange(5))
    for bad in (math.nan, math.inf, -math.inf):
        for position in (0, 1_500_000, 2_999_999):
            x = big.clone()
            x[position] = bad
            assert not all_finite(x), (bad, position)
