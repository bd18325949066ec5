"""Healing (posthoc.analyse.moe.heal): the layer-wise phase that also trains the experts' matrices
(`layer_heal_ffn_lr`), checked on an amplified tiny BERT against the model's own FFN modules."""

from __future__ import annotations

import pytest
import torch
from moe_fixtures import amplified_copy
from tiny_text import make_tiny_bert, synthetic_corpus

import posthoc
from posthoc.analyse.moe.layers import HEALED_THRESHOLD, unit_scores
from posthoc.analyse.moe.moefier import MoEfier
from posthoc.analyse.moe.scoring import moe_installed
from posthoc.models import load_model

FAST = {"max_tokens": 1500, "router_tokens": 600, "router_epochs": 3, "progress": False}
LAYERWISE = dict(experts=4, top_k=1, compensation=True, heal_biases=True, lora_rank=4, layer_heal_epochs=4,
                 heal_lr=0.01, **FAST)


@pytest.fixture(scope="module")
def amplified(tmp_path_factory):
    base = make_tiny_bert(tmp_path_factory.mktemp("heal") / "bert")
    return amplified_copy(base, base.parent / "amplified")


def fit(model, tok, layer_ffn_lr: float, **params) -> MoEfier:
    moe = MoEfier(**{**LAYERWISE, **params}).set_params(layer_heal_ffn_lr=layer_ffn_lr)
    return moe.fit(model, synthetic_corpus(10), tokenizer=tok)


def dense_ffn(model, x: torch.Tensor) -> torch.Tensor:
    """The first FFN of the original model, from its own modules (GELU intermediate, then output.dense)."""
    layer = model.bert.encoder.layer[0] if hasattr(model, "bert") else model.encoder.layer[0]
    with torch.no_grad():
        return layer.output.dense(layer.intermediate(x))


def test_layer_wise_healing_trains_the_experts_matrices_and_fits_the_dense_ffn_better(amplified, tmp_path):
    model, tok, _ = load_model(amplified)
    frozen = fit(model, tok, 0.0)
    trained = fit(model, tok, 1e-2)
    assert "first_weight" not in frozen.heal_state_[0]
    assert {"first_weight", "down_t", "lora_a", "compensation"} <= set(trained.heal_state_[0])
    x = trained.speed_inputs_  # real inputs of the first FFN (the layer-wise training sample's first rows)
    target = dense_ffn(model, x)
    errors = []
    for moe in (frozen, trained):
        with torch.no_grad():
            errors.append(float((moe.build_layer(model, 0, permuted=False)(x) - target).square().mean()))
    assert errors[1] < 0.9 * errors[0]
    # the healing state's matrices differ from the model's and are the ones build_layer loads
    trained.heal_state_, state = [{} for _ in trained.ffns_], trained.heal_state_
    unhealed = trained.build_layer(model, 0, permuted=False).state_dict()
    trained.heal_state_ = state
    assert not torch.allclose(state[0]["first_weight"], unhealed["first_weight"])
    torch.testing.assert_close(trained.build_layer(model, 0, permuted=False).state_dict()["down_t"], state[0]["down_t"])
    # the model itself is unchanged: its FFN still gives the dense output
    torch.testing.assert_close(dense_ffn(model, x), target)


def test_whole_model_healing_keeps_the_layer_wise_matrices_and_round_trips(amplified, tmp_path):
    model, tok, _ = load_model(amplified)
    layer_only = fit(model, tok, 1e-2)
    both = fit(model, tok, 1e-2, heal_steps=3, heal_batch_size=8, heal_tokens=400)  # heal_ffn_lr 0: frozen there
    assert len(both.heal_log_["losses"]) == 3
    for a, b in zip(layer_only.heal_state_, both.heal_state_):
        torch.testing.assert_close(b["first_weight"], a["first_weight"])  # same seed, same layer-wise phase
        torch.testing.assert_close(b["down_t"], a["down_t"])
        assert not torch.allclose(b["alpha"], a["alpha"]) or not torch.allclose(b["lora_b"], a["lora_b"])
    out = both.save(tmp_path / "healed", base=amplified)
    batch = dict(tok(list(synthetic_corpus(10).texts[:4]), padding=True, return_tensors="pt"))
    with moe_installed(both, model), torch.no_grad():
        expected = model(**batch).last_hidden_state
    with torch.no_grad():
        loaded = posthoc.load(out)(**batch).last_hidden_state
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-4)


def experts_per_token(moe: MoEfier, model, tok, texts, healed: bool = True) -> float:
    """Experts computed per token, averaged over FFNs, counted independently from the router scores."""
    batch = dict(tok(list(texts), padding=True, return_tensors="pt"))
    counts = []
    with moe_installed(moe, model, healed=healed) as layers, torch.no_grad():
        hooks = [layer.router.register_forward_hook(
            lambda m, i, o, layer=layer: counts.append(float(
                ((unit_scores(layer, o) >= layer.threshold).sum(1).clamp(min=1)).float().mean())))
            for layer in layers]
        model(**batch)
        for h in hooks:
            h.remove()
    return sum(counts) / len(counts)


def test_healing_keeps_threshold_routing_at_its_budget(amplified, monkeypatch):
    from posthoc.analyse.moe import heal as heal_module

    model, tok, _ = load_model(amplified)
    data = synthetic_corpus(10)
    params = dict(experts=4, top_k=2, routing="threshold", compensation=True, layer_heal_epochs=2, heal_steps=25,
                  heal_lr=0.05, heal_batch_size=8, heal_tokens=400, **FAST)
    kept = MoEfier(**params).fit(model, data, tokenizer=tok)
    kept_k = experts_per_token(kept, model, tok, data.texts)
    assert 1.6 <= kept_k <= 2.4  # average k = 2 of 4
    assert all(t is not None and 0 < t < 1 for t in kept.thresholds_)
    # the healed routers keep their own thresholds in the healing state; the unhealed ones keep theirs
    assert all(HEALED_THRESHOLD in state for state in kept.heal_state_)
    assert 1.6 <= experts_per_token(kept, model, tok, data.texts, healed=False) <= 2.4
    # without the guard the trained routers leave the budget (here fewer experts; on MiniLM 25 % -> 91 %)
    monkeypatch.setattr(heal_module, "threshold_budgets", lambda layers: [None] * len(layers))
    drifted = MoEfier(**params).fit(model, data, tokenizer=tok)
    assert abs(experts_per_token(drifted, model, tok, data.texts) - 2) > 2 * abs(kept_k - 2)


def test_a_healed_output_is_dense_only_unhealed_at_every_expert_and_warns_at_another_k(amplified, tmp_path, caplog):
    model, tok, _ = load_model(amplified)
    moe = fit(model, tok, 1e-2, heal_steps=3, heal_batch_size=8, heal_tokens=400)  # experts 4, healed at top-1
    assert moe.is_healed() and not MoEfier(**LAYERWISE).is_healed()
    out = moe.save(tmp_path / "healed_k1", base=amplified)
    batch = dict(tok(list(synthetic_corpus(10).texts[:4]), padding=True, return_tensors="pt"))
    with torch.no_grad():
        dense = model(**batch).last_hidden_state
        caplog.clear()
        unhealed_full = posthoc.load(out, top_k=4, healed=False)(**batch).last_hidden_state
        assert "healed at top_k" not in caplog.text
        torch.testing.assert_close(unhealed_full, dense, atol=1e-5, rtol=1e-4)  # K = E, nothing healed: dense
        healed_full = posthoc.load(out, top_k=4)(**batch).last_hidden_state
        assert "healed at top_k [1], not 4" in caplog.text and "healed=False" in caplog.text
        assert not torch.allclose(healed_full, dense, atol=1e-3)  # the LoRA and trained matrices stay on
        caplog.clear()
        posthoc.load(out)  # the k it was healed at: no warning
        assert "healed at top_k" not in caplog.text
