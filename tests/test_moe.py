"""MoE-fication on tiny BERT (GELU), Llama (SwiGLU) and OPT (ReLU, named FFNs): partitions, routers, the
runtime MoE layer against an independent per-token computation, outputs transformers loads, levers,
healing, report and CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from moe_fixtures import OPT_FFN_MODULES, amplified_copy, make_tiny_llama, make_tiny_opt
from posthoc.cli import main
from tiny_text import make_tiny_bert, synthetic_corpus

import posthoc
from posthoc.analyse.moe.layers import calibrate_threshold, moe_layers
from posthoc.analyse.moe.moefier import PARAMS, MoEfier, greedy_budget, router_recall
from posthoc.analyse.moe.partition import (
    balanced_kmeans,
    coactivation_partition,
    expert_sizes,
    order_from_labels,
    random_partition,
)
from posthoc.analyse.moe.scoring import moe_installed
from posthoc.errors import ConfigError
from posthoc.ffn import ffn_weights, find_ffns
from posthoc.models import load_model

FAST = {"max_tokens": 1500, "router_tokens": 600, "router_epochs": 3, "progress": False}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {"bert": make_tiny_bert(root / "bert"), "llama": make_tiny_llama(root / "llama"),
            "opt": make_tiny_opt(root / "opt"), "root": root}


@pytest.fixture(scope="module")
def fitted(models):
    """fitted(arch, **params): an MoEfier fitted once per configuration in this module."""
    cache = {}

    def get(arch, **params):
        key = (arch, tuple(sorted(params.items())))
        if key not in cache:
            settings = {"experts": 4, "top_k": 2, **FAST, **params}
            cache[key] = MoEfier(**settings).fit(str(models[arch]), synthetic_corpus(20))
        return cache[key]

    return get


def inputs_for(directory, texts):
    _, tok, _ = load_model(directory)
    return dict(tok(list(texts), padding=True, return_tensors="pt"))


def run(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


# ------------------------------------------------------------------------------------------ partitions


def test_expert_sizes_when_experts_do_not_divide_the_width():
    assert expert_sizes(10, 3) == [4, 3, 3]
    assert sum(expert_sizes(1536, 7)) == 1536 and max(expert_sizes(1536, 7)) - min(expert_sizes(1536, 7)) <= 1
    with pytest.raises(ConfigError):
        expert_sizes(4, 5)


def test_partitions_recover_planted_groups():
    torch.manual_seed(0)
    sizes = [6, 5, 5]
    truth = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))[torch.randperm(16)]
    centres = torch.nn.functional.normalize(torch.randn(3, 8), dim=1) * 5
    rows = centres[truth] + 0.1 * torch.randn(16, 8)
    labels = balanced_kmeans(rows, sizes)
    assert torch.bincount(labels).tolist() == sizes
    same = (truth[:, None] == truth[None]) == (labels[:, None] == labels[None])
    assert bool(same.all())  # the same grouping, up to renaming
    counts = (truth[:, None] == truth[None]).float() * 50 + torch.rand(16, 16)
    counts = (counts + counts.T) / 2
    labels = coactivation_partition(counts, sizes, keep_percentile=0.5)
    assert torch.bincount(labels).tolist() == sizes
    assert bool(((truth[:, None] == truth[None]) == (labels[:, None] == labels[None])).all())
    r = random_partition(16, sizes, seed=1)
    assert torch.bincount(r).tolist() == sizes
    order = order_from_labels(r, sizes)
    assert sorted(order.tolist()) == list(range(16)) and (r[order][:6] == 0).all()


def test_greedy_budget_and_threshold_calibration():
    errors = [torch.tensor([10.0, 5.0, 1.0, 0.0]), torch.tensor([1.0, 0.5, 0.2, 0.0])]
    assert greedy_budget(errors, 4) == [3, 1]  # the layer that loses more gets more experts
    scores = torch.rand(2000, 8, generator=torch.Generator().manual_seed(0))
    unit = scores / scores.max(1, keepdim=True).values
    tau = calibrate_threshold(unit, 3.0)
    assert abs((unit >= tau).sum(1).clamp(min=1).float().mean().item() - 3.0) < 0.05
    mass = torch.rand(100, 6)
    assert router_recall(mass, mass, 2) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ the MoE layer


def reference_moe_output(w, order, sizes, shared, router, x, k):
    """Per token, from the ORIGINAL (unpermuted) weights: shared neurons + the router's top-k experts."""
    offsets = [shared]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    scores = router(x)
    out = []
    for t in range(x.shape[0]):
        keep = order[:shared].tolist()
        for e in scores[t].topk(k).indices.tolist():
            keep += order[offsets[e] : offsets[e + 1]].tolist()
        mask = torch.zeros(w.d_ff)
        mask[keep] = 1
        out.append(w.output(w.hidden(x[t : t + 1]) * mask))
    return torch.cat(out)


@pytest.mark.parametrize("arch,params", [
    ("bert", {"partition": "kmeans", "router": "mlp"}),
    ("llama", {"partition": "coactivation", "router": "centroid", "shared": 0.25}),
    ("llama", {"partition": "random", "router": "mlp", "kmeans_rows": "both"}),
])
def test_moe_layer_matches_independent_per_token_computation(models, fitted, arch, params):
    moe = fitted(arch, **params)
    model, _, _ = load_model(models[arch])
    x = torch.randn(9, 32)
    for i, ffn in enumerate(moe.ffns_):
        layer = moe.build_layer(model, i, permuted=False)
        w = ffn_weights(model, ffn)
        router = moe.routers_[i][moe.router]
        expected = reference_moe_output(w, moe.orders_[i], moe.sizes_[i], moe.shared_[i], router, x, 2)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-4)
        assert sorted(moe.orders_[i].tolist()) == list(range(64))
        assert sum(moe.sizes_[i]) + moe.shared_[i] == 64


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_output_is_the_same_dense_model_and_loads_as_moe(models, fitted, arch, tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM

    base = models[arch]
    moe = fitted(arch, partition="kmeans", router="mlp") if arch == "bert" else fitted(arch, partition="random", router="mlp", kmeans_rows="both")
    out = moe.save(tmp_path / "out")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "experts.safetensors", "experts.json", "module.json"} <= names
    auto = AutoModelForCausalLM if arch == "llama" else AutoModel
    batch = inputs_for(base, ["alphaone the betatwo of gammathree", "deltafour and the epsilonfive"])
    dense = run(auto.from_pretrained(base).eval(), batch)
    permuted = auto.from_pretrained(out).eval()
    torch.testing.assert_close(run(permuted, batch), dense, atol=1e-5, rtol=1e-5)  # dense function unchanged
    up = ffn_weights(permuted, find_ffns(permuted)[0]).up
    original = ffn_weights(auto.from_pretrained(base), find_ffns(permuted)[0]).up
    assert torch.equal(up, original[moe.orders_[0]])  # and the neurons really moved
    full = posthoc.load(out, top_k=4)
    torch.testing.assert_close(run(full, batch), dense, atol=1e-5, rtol=1e-4)  # K = E: the dense model
    sparse = posthoc.load(out, top_k=1)
    assert not torch.allclose(run(sparse, batch), dense, atol=1e-3)
    in_memory = auto.from_pretrained(base).eval()
    with moe_installed(moe, in_memory, top_k=1):
        torch.testing.assert_close(run(sparse, batch), run(in_memory, batch), atol=1e-5, rtol=1e-4)
    manifest = json.loads((out / "module.json").read_text())
    assert manifest["kind"] == "experts" and manifest["tags"]["experts"] == "4"


def test_named_ffns_of_an_unknown_model(models, tmp_path):
    moe = MoEfier(experts=4, top_k=4, ffn_modules=OPT_FFN_MODULES, partition="kmeans", **FAST)
    moe.fit(str(models["opt"]), synthetic_corpus(20))
    out = moe.save(tmp_path / "opt-moe")
    batch = inputs_for(models["opt"], ["alphaone the betatwo"])
    model, _, _ = load_model(models["opt"])
    torch.testing.assert_close(run(posthoc.load(out), batch), run(model, batch), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ levers


def test_greedy_budget_compares_layers_on_relative_output_errors(models, fitted):
    from posthoc.analyse.moe.moefier import output_errors

    moe = fitted("llama", partition="kmeans", router="mlp")
    model, _, _ = load_model(models["llama"])
    layer = moe.build_layer(model, 0, permuted=False)
    x = moe.speed_inputs_[:256]
    errors = output_errors(layer, x)
    with torch.no_grad():
        dense = layer.hidden_all(x) @ layer.down_t
        top = layer.router_scores(x).topk(1, dim=1).indices[:, 0]
        one = torch.stack([layer.hidden_all(x[t : t + 1])[0, lo:hi] @ layer.down_t[lo:hi]
                           for t, (lo, hi) in enumerate((layer.offsets[e], layer.offsets[e + 1]) for e in top.tolist())])
        expected = (one - dense).square().sum(-1).mean() / dense.square().sum(-1).mean()
        torch.testing.assert_close(errors[0], expected, rtol=1e-4, atol=1e-6)
        assert float(errors[-1]) < 1e-6  # every expert: the dense output
        layer.down_t.mul_(10)  # a layer ten times louder loses the same share of its output
        torch.testing.assert_close(output_errors(layer, x), errors, rtol=1e-4, atol=1e-6)


def test_measured_fraction_counts_the_experts_computed(models, fitted):
    from posthoc.analyse.moe.scoring import active_fraction, measured_fraction

    moe = fitted("llama", partition="kmeans", router="mlp")
    model, _, _ = load_model(models["llama"])
    x = moe.speed_inputs_[:200]
    layer = moe.build_layer(model, 0, permuted=False)
    assert measured_fraction([layer]) is None
    with torch.no_grad():
        layer(x)
    assert measured_fraction([layer]) == pytest.approx(active_fraction([layer]))  # top-k: k experts per token
    layer = moe.build_layer(model, 0, permuted=False)
    layer.set_routing(routing="threshold", threshold=0.5)
    with torch.no_grad():
        layer(x)
        layer(x[:50])
        pairs = len(layer.select(layer.router_scores(x))[0]) + len(layer.select(layer.router_scores(x[:50]))[0])
    assert measured_fraction([layer]) == pytest.approx(pairs / 250 * (layer.d_ff / layer.experts) / layer.d_ff)


def test_levers_threshold_budget_compensation(models):
    data = synthetic_corpus(20)
    plain = MoEfier(experts=8, top_k=2, **FAST).fit(str(models["llama"]), data)
    levers = MoEfier(experts=8, top_k=2, routing="threshold", layer_budget="greedy", compensation=True,
                     score="output", **FAST).fit(str(models["llama"]), data)
    assert sum(levers.top_k_) == 2 * len(levers.ffns_)
    assert all(t is not None for t in levers.thresholds_)
    model, tok, _ = load_model(models["llama"])
    batch = inputs_for(models["llama"], list(data.texts[:20]))
    counts = []
    with moe_installed(levers, model) as layers, torch.no_grad():
        hooks = [layer.register_forward_hook(lambda m, a, o: None) for layer in layers]
        for layer in layers:
            original = layer.select

            def counting(scores, layer=layer, original=original):
                tokens, experts = original(scores)
                counts.append((layer, len(experts) / scores.shape[0]))
                return tokens, experts

            layer.select = counting
        model(**batch)
        for h in hooks:
            h.remove()
    for layer, per_token in counts:  # a variable number per token, about the layer's budget on average
        assert 1 <= per_token <= layer.experts
        assert abs(per_token - layer.top_k) < 1.0
    # compensation: on the calibration sample it was fitted on, the skipped experts' conditional means
    # remove the mean output error exactly (Σ over tokens of Σ_{e∉S} (y_e − c_e) = 0 by construction)
    x = levers.speed_inputs_  # layer 0's whole sample (router_tokens is below 2048 here)
    dense_out = ffn_weights(model, find_ffns(model)[0])(x)
    layer = levers.build_layer(model, 0, permuted=False)
    with torch.no_grad():
        with_comp = (layer(x) - dense_out).mean(0).norm()
        layer.use_compensation = False
        without = (layer(x) - dense_out).mean(0).norm()
    assert with_comp < 1e-4 * max(float(without), 1e-3) + 1e-6
    assert plain.compensation_ is None and levers.compensation_[0].shape == (8, 32)


@pytest.fixture(scope="module")
def amplified_bert(models):
    return amplified_copy(models["bert"], models["root"] / "amplified")


def test_healing_reduces_the_distillation_loss_and_round_trips(amplified_bert, tmp_path):
    from posthoc.analyse.calibration import CalibrationData, token_batches
    from posthoc.analyse.moe.heal import distillation_loss

    base = amplified_bert
    model, tok, _ = load_model(base)
    data = synthetic_corpus(10)
    moe = MoEfier(experts=4, top_k=1, heal_steps=15, heal_lr=0.01, lora_rank=4, heal_batch_size=8, **FAST)
    moe.fit(str(base), data)
    assert len(moe.heal_log_["losses"]) == 15
    assert any(float(s["alpha"].abs().sum()) > 0 for s in moe.heal_state_)
    batches = list(token_batches(tok, CalibrationData.of(data), max_length=32, batch_size=8))

    def mean_loss(healed):
        with moe_installed(moe, model, healed=healed), torch.no_grad():
            return sum(float(distillation_loss(model, b.inputs, causal=False)) for b in batches) / len(batches)

    assert mean_loss(True) < 0.8 * mean_loss(False)
    out = moe.save(tmp_path / "healed")
    batch = inputs_for(base, list(data.texts[:4]))
    with moe_installed(moe, model):
        expected = run(model, batch)
    torch.testing.assert_close(run(posthoc.load(out), batch), expected, atol=1e-5, rtol=1e-4)


def test_healing_loss_terms_match_an_independent_computation(amplified_bert):
    from posthoc.analyse.moe.heal import distillation_loss, teacher_outputs

    model, tok, _ = load_model(amplified_bert)
    moe = MoEfier(experts=4, top_k=1, **FAST).fit(model, synthetic_corpus(10), tokenizer=tok)
    batch = inputs_for(amplified_bert, ["a short text", "a somewhat longer text about a topic"])
    dense = teacher_outputs(model, batch, causal=False, hidden=True)
    mask = batch["attention_mask"].bool()
    with moe_installed(moe, model), torch.no_grad():
        student = model(**batch, output_hidden_states=True)
        base = float(distillation_loss(model, batch, causal=False))
        both = float(distillation_loss(model, batch, causal=False, hidden_weight=0.5))
        given = float(distillation_loss(model, batch, causal=False, teacher=dense, hidden_weight=0.5))
    errors = [float(((s[mask] - t[mask]) ** 2).sum() / (t[mask] ** 2).sum())
              for s, t in zip(student.hidden_states[1:], dense["hidden"])]
    assert len(errors) == model.config.num_hidden_layers and min(errors) > 0
    assert both == pytest.approx(base + 0.5 * sum(errors) / len(errors), rel=1e-4)
    assert given == pytest.approx(both, rel=1e-4)  # the MoE layers' dense mode is the dense model


def test_healing_trains_compensation_biases_and_experts_against_the_original_model(amplified_bert, tmp_path, monkeypatch):
    from transformers import AutoModel

    from posthoc.analyse.moe import heal as heal_module

    model, tok, _ = load_model(amplified_bert)
    data = synthetic_corpus(10)
    params = dict(experts=4, top_k=1, compensation=True, heal_biases=True, heal_hidden=1.0, heal_steps=12,
                  heal_lr=0.01, heal_ffn_lr=1e-3, heal_batch_size=8, heal_tokens=400, **FAST)
    moe = MoEfier(**params).fit(model, data, tokenizer=tok)
    assert moe.heal_log_["batches"] < 12  # the batches cycle: the teacher's outputs are cached
    state = moe.heal_state_[0]
    assert {"alpha", "compensation", "first_bias", "down_bias", "first_weight", "down_t"} <= set(state)
    healed = moe.build_layer(model, 0, permuted=False).state_dict()
    moe.heal_state_, saved = [{} for _ in moe.ffns_], moe.heal_state_
    unhealed = moe.build_layer(model, 0, permuted=False).state_dict()
    moe.heal_state_ = saved
    for key in ("compensation", "first_bias", "down_bias", "first_weight", "down_t"):
        assert not torch.allclose(state[key], unhealed[key])  # trained
        torch.testing.assert_close(healed[key], state[key])  # and loaded by build_layer
    # the teacher was the original model, not the trained layers in dense mode: without the cache (fp16
    # teacher) the losses are the same to fp16 precision
    monkeypatch.setattr(heal_module, "TEACHER_CACHE_BYTES", 0)
    uncached = MoEfier(**params).fit(model, data, tokenizer=tok)
    assert uncached.heal_log_["losses"] == pytest.approx(moe.heal_log_["losses"], rel=2e-3, abs=1e-4)
    out = moe.save(tmp_path / "healed", base=amplified_bert)
    batch = inputs_for(amplified_bert, list(data.texts[:4]))
    with moe_installed(moe, model):
        expected = run(model, batch)
    torch.testing.assert_close(run(posthoc.load(out), batch), expected, atol=1e-5, rtol=1e-4)
    # the checkpoint is still the dense model: healing lives in the MoE files only
    torch.testing.assert_close(run(AutoModel.from_pretrained(out), batch), run(model, batch), atol=1e-5, rtol=1e-4)


def test_reduced_rank_regression_recovers_a_low_rank_map_and_layer_healing_helps(models, fitted):
    from posthoc.analyse.moe.heal import dense_outputs, reduced_rank_regression

    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=g)
    a_true, b_true = torch.randn(3, 12, generator=g), torch.randn(10, 3, generator=g)
    a, b = reduced_rank_regression(x, x @ a_true.T @ b_true.T, 3, ridge=0.0)
    torch.testing.assert_close(x @ a.T @ b.T, x @ a_true.T @ b_true.T, atol=1e-3, rtol=1e-3)
    plain = fitted("llama", partition="kmeans", router="mlp")
    healed = fitted("llama", partition="kmeans", router="mlp", lora_rank=8, layer_heal_epochs=3)
    model, _, _ = load_model(models["llama"])
    x = plain.speed_inputs_
    errors = []
    for moe in (plain, healed):
        layer = moe.build_layer(model, 0, permuted=False)
        with torch.no_grad():
            errors.append(float((layer(x) - dense_outputs(layer, x)).square().mean()))
    assert errors[1] < 0.8 * errors[0]


# ------------------------------------------------------------------------------------------ estimator contract


def test_estimator_contract():
    moe = MoEfier(experts=8)
    assert moe.get_params()["experts"] == 8 and not hasattr(moe, "partition_")
    with pytest.raises(ConfigError, match="no parameter 'expert'"):
        MoEfier(expert=8)
    for name, bad in (("top_k", 0), ("top_k", 9), ("partition", "metis"), ("shared", 1.0), ("router", "x"),
                      ("heal_hidden", -1.0), ("heal_ffn_lr", -1e-4), ("heal_tokens", 0), ("heal_biases", "yes")):
        with pytest.raises(ConfigError, match=rf"The '{name}' parameter of MoEfier must be"):
            PARAMS.validate({**moe.get_params(), name: bad})


# ------------------------------------------------------------------------------------------ CLI, report, bad input


def test_cli_end_to_end_with_report(models, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(synthetic_corpus(20).texts))
    out = tmp_path / "cli-out"
    result = CliRunner().invoke(main, ["split", "moe", str(models["bert"]), str(out), "--calib", str(calib),
                                       "--experts", "4", "--top-k", "2", "--max-tokens", "3000", "--router-tokens",
                                       "1000", "--router-epochs", "3", "--eval-texts", "20", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "FFN speed" in result.output
    assert (out / "report.html").is_file()
    pngs = {p.name for p in out.glob("*.png")}
    assert {"expert_sizes.png", "router_recall.png", "quality_vs_fraction.png", "speed.png"} <= pngs
    info = json.loads((out / "experts.json").read_text())
    assert {r["router"] for r in info["evaluation"]["rows"]} == {"oracle", "centroid", "mlp"}


def cli(args):
    return CliRunner().invoke(main, ["split", "moe", "--quiet", *map(str, args)])


def test_bad_input_is_one_line_and_writes_nothing(models, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(synthetic_corpus(10).texts))
    out = tmp_path / "never"
    cases = [
        ([models["opt"], out, "--calib", calib], "--ffn-modules"),  # no recognised FFN
        ([models["bert"], out, "--calib", calib, "--experts", "4", "--top-k", "5"], "'top_k' parameter of MoEfier"),
        ([models["bert"], out, "--calib", calib, "--experts", "65"], "'experts' parameter of MoEfier"),
        ([models["bert"], out, "--calib", tmp_path / "missing.txt"], "no such calibration file"),
    ]
    (tmp_path / "empty.txt").write_text("\n \n")
    cases.append(([models["bert"], out, "--calib", tmp_path / "empty.txt"], "holds no text"))
    (tmp_path / "short.txt").write_text("alphaone betatwo\n")
    cases.append(([models["bert"], out, "--calib", tmp_path / "short.txt"], "too few to hold 10% out"))
    cases.append(([models["bert"], out, "--calib", tmp_path / "short.txt", "--eval", calib, "--experts", "16"],
                  "needs at least 128"))
    for args, message in cases:
        result = cli(args)
        assert result.exit_code == 2, result.output
        assert message in result.output and result.output.startswith("error:")
        assert len(result.output.strip().splitlines()) == 1
        assert not out.exists()
        assert not list(tmp_path.glob(".never*"))  # no staging left behind


def test_experts_not_dividing_the_width(models):
    moe = MoEfier(experts=7, top_k=3, **FAST).fit(str(models["bert"]), synthetic_corpus(20))
    assert moe.sizes_[0] == [10, 9, 9, 9, 9, 9, 9]
    model, _, _ = load_model(models["bert"])
    batch = inputs_for(models["bert"], ["alphaone the betatwo"])
    dense = run(model, batch)
    with moe_installed(moe, model, top_k=7):
        torch.testing.assert_close(run(model, batch), dense, atol=1e-5, rtol=1e-4)


def test_load_refuses_what_is_not_an_moe_output(models, fitted, tmp_path):
    from posthoc.modules.format import ModuleError

    with pytest.raises(ModuleError, match="not the output of `posthoc split moe`"):
        posthoc.load(models["bert"])
    moe = fitted("bert", partition="kmeans", router="mlp")
    out = moe.save(tmp_path / "o")
    manifest = json.loads((out / "module.json").read_text())
    (out / "module.json").write_text(json.dumps({**manifest, "kind": "delta", "tensors": {}}))
    with pytest.raises(ModuleError, match="kind 'delta'"):
        posthoc.load(out)
    (out / "module.json").write_text(json.dumps(manifest))
    info = json.loads((out / "experts.json").read_text())
    (out / "experts.json").write_text(json.dumps({**info, "experts_format_version": 99, "posthoc_version": "9.0"}))
    with pytest.raises(ModuleError, match="posthoc 9.0 with experts format 99"):
        posthoc.load(out)
    (out / "experts.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match="'top_k' parameter must be an int in \\[1, experts=4\\]"):
        posthoc.load(out, top_k=5)
    assert len(moe_layers(posthoc.load(out, top_k=3))) == 2
    other_out = fitted("bert", partition="random", seed=1).save(tmp_path / "other")
    (out / "model.safetensors").write_bytes((other_out / "model.safetensors").read_bytes())
    with pytest.raises(ModuleError, match="not the ones the routers were made for"):
        posthoc.load(out)
