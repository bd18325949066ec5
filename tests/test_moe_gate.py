"""The gate router of GLU FFNs (`--router gate`): against the dense FFN at k = E, against a direct per-token
formula (gate scores computed here from the original weights) at k < E, the one-line error on BERT, and the
save -> posthoc.load round trip."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from moe_fixtures import make_tiny_llama
from posthoc.cli import main
from tiny_text import make_tiny_bert, synthetic_corpus

import posthoc
from posthoc.analyse.moe.layers import GateRouter, MoEFFN, moe_layers
from posthoc.analyse.moe.moefier import MoEfier
from posthoc.analyse.moe.scoring import moe_installed
from posthoc.errors import ConfigError
from posthoc.ffn import ffn_weights
from posthoc.models import load_model

FAST = {"max_tokens": 1500, "router_tokens": 600, "progress": False, "router": "gate", "score": "output"}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("gate") / "llama")


@pytest.fixture(scope="module")
def fitted(llama):
    cache = {}

    def get(**params):
        key = tuple(sorted(params.items()))
        if key not in cache:
            cache[key] = MoEfier(**{"experts": 8, "top_k": 3, **FAST, **params}).fit(str(llama), synthetic_corpus(20))
        return cache[key]

    return get


def direct_output(w, order, sizes, shared, x, k, up_scale=None):
    """Per token: gate scores from the original weights (|silu(W_gate x)| · ‖W_down col‖ [· up RMS], summed
    over each expert's neurons), keep the shared neurons and the top-k experts, run the dense FFN masked."""
    a = torch.nn.functional.silu(x @ w.gate.T)  # (T, d_ff), original neuron order
    weight = w.down.norm(dim=0) * (1 if up_scale is None else up_scale)
    routed = order[shared:]
    bounds = torch.tensor([0, *sizes]).cumsum(0)
    scores = torch.stack([(a[:, routed[lo:hi]].abs() * weight[routed[lo:hi]]).sum(1)
                          for lo, hi in zip(bounds[:-1], bounds[1:])], 1)  # (T, E)
    mask = torch.zeros(x.shape[0], w.d_ff)
    mask[:, order[:shared]] = 1
    for t in range(x.shape[0]):
        for e in scores[t].topk(k).indices.tolist():
            mask[t, routed[bounds[e] : bounds[e + 1]]] = 1
    return w.output(w.hidden(x) * mask)


def test_all_experts_is_the_dense_ffn(llama, fitted):
    moe = fitted()
    model, _, _ = load_model(llama)
    x = torch.randn(11, 32)
    for i, ffn in enumerate(moe.ffns_):
        layer = moe.build_layer(model, i, permuted=False, top_k=8)
        assert isinstance(layer.router, GateRouter) and layer.gated
        w = ffn_weights(model, ffn)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), w.output(w.hidden(x)), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("params", [{}, {"shared": 0.25, "partition": "random"}, {"gate_up_scale": True}])
def test_top_k_matches_the_direct_formula(llama, fitted, params):
    moe = fitted(**params)
    model, _, _ = load_model(llama)
    x = torch.randn(13, 32)
    for i, ffn in enumerate(moe.ffns_):
        w = ffn_weights(model, ffn)
        up_scale = None
        if params.get("gate_up_scale"):  # the up projection's RMS on the calibration sample the fit saw
            layer = moe.build_layer(model, i, permuted=False)
            routed = moe.orders_[i][moe.shared_[i]:]
            expected_weight = layer.router.weight
            up_scale = torch.ones(w.d_ff)
            up_scale[routed] = expected_weight / w.down.norm(dim=0)[routed]
            assert (up_scale[routed] > 0).all() and not torch.allclose(up_scale[routed], torch.ones(len(routed)))
        layer = moe.build_layer(model, i, permuted=False)
        expected = direct_output(w, moe.orders_[i], moe.sizes_[i], moe.shared_[i], x, 3, up_scale)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-4)


def test_gates_are_computed_once_and_training_mode_matches(llama, fitted, monkeypatch):
    moe = fitted()
    model, _, _ = load_model(llama)
    layer = moe.build_layer(model, 0, permuted=False)
    x = torch.randn(7, 32)
    with torch.no_grad():
        inference = layer(x)
    calls = []
    original = MoEFFN.gates
    monkeypatch.setattr(MoEFFN, "gates", lambda self, x: calls.append(1) or original(self, x))
    training = layer(x)  # gradient mode: the other (non-workspace) branch
    assert calls == [1]
    torch.testing.assert_close(training.detach(), inference, atol=1e-6, rtol=1e-5)


def test_threshold_routing_keeps_the_average(llama, fitted):
    moe = fitted(routing="threshold")
    model, tok, _ = load_model(llama)
    assert all(t is not None for t in moe.thresholds_)
    with moe_installed(moe, model) as layers:
        batch = dict(tok(list(synthetic_corpus(20).texts[:8]), padding=True, return_tensors="pt"))
        with torch.no_grad():
            model(**batch)
        assert all(1 <= layer.seen[1] / layer.seen[0] <= 8 for layer in layers)


def test_bert_gets_a_one_line_error_naming_the_option(tmp_path):
    bert = make_tiny_bert(tmp_path / "bert")
    with pytest.raises(ConfigError, match="--router"):
        MoEfier(experts=4, top_k=2, **FAST).fit(str(bert), synthetic_corpus(20))
    out, calib = tmp_path / "out", tmp_path / "calib.txt"
    calib.write_text("\n".join(synthetic_corpus(20).texts))
    result = CliRunner().invoke(main, ["split", "moe", str(bert), str(out), "--calib", str(calib), "--router", "gate",
                                       "--experts", "4", "--top-k", "2", "--quiet"])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "--router" in result.output
    assert not out.exists()


def test_save_and_load_round_trip(llama, fitted, tmp_path):
    from transformers import AutoModelForCausalLM

    moe = fitted()
    out = moe.save(tmp_path / "out")
    _, tok, _ = load_model(llama)
    batch = dict(tok(["alphaone the betatwo of gammathree", "deltafour and the epsilonfive"], padding=True,
                     return_tensors="pt"))
    with torch.no_grad():
        dense = AutoModelForCausalLM.from_pretrained(llama).eval()(**batch).logits
        loaded = posthoc.load(out)
        assert all(layer.gated and layer.top_k == 3 for layer in moe_layers(loaded))
        sparse = loaded(**batch).logits
        in_memory = AutoModelForCausalLM.from_pretrained(llama).eval()
        with moe_installed(moe, in_memory):
            torch.testing.assert_close(sparse, in_memory(**batch).logits, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(sparse, dense, atol=1e-3)
        torch.testing.assert_close(posthoc.load(out, top_k=8)(**batch).logits, dense, atol=1e-5, rtol=1e-4)


def test_masked_kernel_is_the_same_function(llama, fitted):
    moe = fitted(shared=0.25, partition="random", compensation=True)
    model, _, _ = load_model(llama)
    x = torch.randn(10, 32)
    for i in range(len(moe.ffns_)):
        grouped = moe.build_layer(model, i, permuted=False)
        masked = moe.build_layer(model, i, permuted=False)
        masked.masked = True
        with torch.no_grad():
            torch.testing.assert_close(masked(x), grouped(x), atol=1e-5, rtol=1e-4)
            skipped = torch.ones(10, grouped.experts).scatter_(1, grouped.router_scores(x).topk(3).indices, 0.0)
            with_compensation = grouped(x)
            grouped.use_compensation = False  # the compensation adds Σ_{e∉S} c_e
            torch.testing.assert_close(with_compensation - grouped(x), skipped @ grouped.compensation,
                                       atol=1e-5, rtol=1e-4)
            grouped.use_compensation = True
            for layer in (grouped, masked):  # healed expert scales: w_e = 1 + α_e σ(r_e)
                layer.alpha.copy_(torch.linspace(-0.5, 0.5, layer.experts))
            torch.testing.assert_close(masked(x), grouped(x), atol=1e-5, rtol=1e-4)
    single = MoEfier(**{"experts": 48, "top_k": 20, **FAST, "partition": "random", "kernel": "masked"})
    single.fit(str(llama), synthetic_corpus(20))  # one neuron per expert: the per-neuron gate selection
    w = ffn_weights(model, single.ffns_[0])
    layer = single.build_layer(model, 0, permuted=False)
    assert layer.masked
    with torch.no_grad():
        expected = direct_output(w, single.orders_[0], single.sizes_[0], single.shared_[0], x, 20)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-4)
