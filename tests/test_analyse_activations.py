"""The shared calibration / activation collection: loaders, batching, statistics against direct
computations on tiny BERT (padding) and Llama (packing) models, interventions, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from moe_fixtures import OPT_FFN_MODULES, make_tiny_llama, make_tiny_opt
from tiny_text import make_tiny_bert, synthetic_corpus

from posthoc.analyse.activations import (
    Activations,
    ActiveCounts,
    CoActivation,
    InputSample,
    LabelSums,
    Moments,
    SecondMoments,
    collect,
    edit_neurons,
    neuron_masks,
)
from posthoc.analyse.calibration import CalibrationData, load_calibration, token_batches
from posthoc.analyse.evaluate import perplexity
from posthoc.errors import ConfigError, DataError
from posthoc.ffn import FFNNotFoundError, ffn_weights, find_ffns, neuron_scores
from posthoc.models import load_model
from posthoc.threads import torch_threads


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("acts")
    bert = load_model(make_tiny_bert(root / "bert"))
    llama = load_model(make_tiny_llama(root / "llama"))
    return {"bert": bert, "llama": llama, "root": root}


def direct_activations(model, ffn, batches):
    """h and x of one FFN for every real token, captured the plain way (no posthoc hooks) — the reference."""
    up, _, down = ffn.modules(model)
    xs, hs = [], []
    handles = [up.register_forward_hook(lambda m, a, o: xs.append(a[0].detach())),
               down.register_forward_hook(lambda m, a, o: hs.append(a[0].detach()))]
    with torch.no_grad():
        masks = []
        for batch in batches:
            model(**batch.inputs)
            masks.append(batch.attention_mask.reshape(-1).bool())
    for h in handles:
        h.remove()
    x = torch.cat([x.reshape(-1, x.shape[-1])[m] for x, m in zip(xs, masks)])
    h = torch.cat([h.reshape(-1, h.shape[-1])[m] for h, m in zip(hs, masks)])
    return x, h


# ------------------------------------------------------------------------------------------ data


def test_loaders_txt_jsonl_csv_dir(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    (tmp_path / "d" / "b.jsonl").write_text('{"text": "json one", "label": "x"}\n{"text": "json two", "label": "y"}\n')
    (tmp_path / "c.csv").write_text("id,content\n1,csv one\n2,csv two\n")
    (tmp_path / "lines.txt").write_text("line one\nline two\nline three\n")
    assert load_calibration(tmp_path / "d" / "a.txt").texts == ("first paragraph\nstill first", "second paragraph")
    assert load_calibration(tmp_path / "lines.txt").texts == ("line one", "line two", "line three")
    j = load_calibration(tmp_path / "d" / "b.jsonl")
    assert j.texts == ("json one", "json two") and j.labels == (0, 1) and j.label_names == ("x", "y")
    assert load_calibration(tmp_path / "c.csv").texts == ("csv one", "csv two")
    assert len(load_calibration(tmp_path / "d")) == 4
    both = load_calibration([tmp_path / "c.csv", tmp_path / "lines.txt"])
    assert len(both) == 5 and both.labels is None


def test_bbc_parts_are_the_shared_split():
    from posthoc.data import load_bbc, stratified_split

    test = load_calibration("bbc:test")
    assert test.texts == stratified_split(load_bbc()).test.texts and test.labels is not None


def test_bad_calibration_data(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(DataError, match="holds no text"):
        load_calibration(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="no such calibration file"):
        load_calibration(tmp_path / "missing.txt")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="--text-column"):
        load_calibration(tmp_path / "bad.csv")
    with pytest.raises(DataError, match="HF_HUB_OFFLINE"):
        load_calibration("hf:wikitext@wikitext-2-raw-v1:train:text")


def test_token_batches_budget_and_packing(tiny):
    _, tok, _ = tiny["llama"]
    data = synthetic_corpus(10)
    padded = list(token_batches(tok, CalibrationData.of(data), max_length=16, batch_size=4, max_tokens=100))
    assert sum(b.num_tokens for b in padded) == 100
    assert all(len(b.token_labels()) == b.num_tokens for b in padded)
    packed = list(token_batches(tok, CalibrationData.of(data), max_length=16, batch_size=4, pack=True, max_tokens=150))
    assert sum(b.num_tokens for b in packed) == 150
    assert all(bool(b.attention_mask.all()) for b in packed)
    ids = torch.cat([b.inputs["input_ids"].reshape(-1) for b in packed])
    first = tok(list(data.texts[:3]), add_special_tokens=False)["input_ids"]
    expected = first[0] + [tok.eos_token_id] + first[1] + [tok.eos_token_id] + first[2]
    assert ids[: len(expected)].tolist() == expected  # texts joined by EOS, in order


# ------------------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_statistics_match_direct_computation(tiny, arch):
    model, tok, _ = tiny[arch]
    data = CalibrationData.of(synthetic_corpus(6))
    batches = list(token_batches(tok, data, max_length=24, batch_size=5, pack=arch == "llama", max_tokens=400))
    if arch == "bert":
        assert not all(bool(b.attention_mask.all()) for b in batches)  # padding is there and must be dropped
    stats = [Moments(), CoActivation(top_fraction=0.25), ActiveCounts(threshold=0.1, score="output", name="active"),
             SecondMoments(of="abs"), InputSample(50, seed=3)]
    if arch == "bert":
        stats.append(LabelSums(5))
    acts = collect(model, None, stats, batches=batches, progress=False)
    ffn = find_ffns(model)[1]
    x, h = direct_activations(model, ffn, batches)
    assert acts.tokens == h.shape[0] == sum(b.num_tokens for b in batches)
    m = acts.result(1, "moments")
    torch.testing.assert_close(m["mean"], h.double().mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(m["mean_abs"], h.double().abs().mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(m["std"], h.double().std(0, unbiased=False), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(m["input_mean"], x.double().mean(0), atol=1e-6, rtol=1e-5)
    norms = ffn.modules(model)[2].weight.double().norm(dim=0)
    torch.testing.assert_close(m["mean_score"], (h.double().abs() * norms).mean(0), atol=1e-6, rtol=1e-5)
    marks = torch.zeros_like(h)
    marks[torch.arange(len(h))[:, None], h.abs().topk(16, dim=1).indices] = 1
    assert torch.equal(acts.result(1, "coactivation")["counts"], marks.T @ marks)
    active = (h.abs() * norms.float() > 0.1).double().sum(0)
    assert torch.equal(acts.result(1, "active")["active"], active)
    corr = acts.result(1, "second_moments")["correlation"]
    torch.testing.assert_close(corr, torch.corrcoef(h.abs().double().T), atol=1e-5, rtol=1e-4)
    sample = acts.result(1, "inputs")
    assert sample["x"].shape == (50, x.shape[1]) and len(set(sample["index"].tolist())) == 50
    torch.testing.assert_close(sample["x"], x[sample["index"]])  # each sampled row is the token it claims
    if arch == "bert":
        labels = torch.cat([b.token_labels() for b in batches])
        sums = acts.result(1, "label_sums")
        for label in range(5):
            torch.testing.assert_close(sums["mean"][label], h[labels == label].double().mean(0), atol=1e-6, rtol=1e-5)


def test_input_sample_is_uniform():
    """Reservoir sampling keeps each of N stream positions with probability max/N."""
    from posthoc.analyse.activations import TokenInfo
    from posthoc.ffn import FFNWeights

    weights = FFNWeights(torch.zeros(4, 2), torch.zeros(2, 4), torch.relu)
    hits = torch.zeros(1000)
    for seed in range(200):
        s = InputSample(100, seed=seed)
        s.start(None, weights)
        for start in range(0, 1000, 64):
            n = min(64, 1000 - start)
            s.update(torch.arange(start, start + n).float()[:, None].expand(n, 2), torch.zeros(n, 4), TokenInfo(None, start))
        assert torch.equal(s.result()["x"][:, 0].long(), s.result()["index"])
        hits[s.result()["index"]] += 1
    assert abs(hits[:500].sum() / hits.sum() - 0.5) < 0.03  # early and late tokens equally likely
    assert hits.mean() == 20


def test_input_sample_rows_are_the_tokens_their_index_names():
    """Many tokens of one update can draw the same reservoir slot: the one kept is the last of them (Algorithm R
    in stream order), in the stored input and in its index alike, whatever the row width or thread count."""
    from posthoc.analyse.activations import TokenInfo
    from posthoc.ffn import FFNWeights

    width = 64
    weights = FFNWeights(torch.zeros(4, width), torch.zeros(width, 4), torch.relu)
    results = []
    for threads in (1, 2):  # on 2 threads an assignment with repeated slots kept a different token per run
        s = InputSample(100, seed=0)
        s.start(None, weights)
        with torch_threads(threads):
            for start in range(0, 4096, 512):  # 512 tokens per update into 100 slots: clashes in every update
                positions = torch.arange(start, start + 512).float()
                s.update(positions[:, None].expand(512, width).contiguous(), torch.zeros(512, 4),
                         TokenInfo(None, start))
        x, index = s.result()["x"], s.result()["index"]
        assert torch.equal(x.long(), index[:, None].expand_as(x))
        results.append(index.clone())
    assert torch.equal(results[0], results[1])


def test_activations_save_and_load(tiny, tmp_path):
    model, tok, _ = tiny["bert"]
    acts = collect(model, synthetic_corpus(3), [Moments(), CoActivation()], tokenizer=tok, progress=False, layers=[0])
    path = acts.save(tmp_path / "acts")
    meta, results = Activations.load_results(path)
    assert meta["tokens"] == acts.tokens and list(results) == [0]
    assert torch.equal(results[0]["coactivation"]["counts"], acts.result(0, "coactivation")["counts"])


def test_collection_stops_after_the_last_watched_layer(tiny):
    model, tok, _ = tiny["llama"]
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    collect(model, synthetic_corpus(2), [Moments()], tokenizer=tok, layers=[0], progress=False)
    handle.remove()
    assert calls == []


def test_too_little_text_and_bad_statistics(tiny):
    model, tok, _ = tiny["bert"]
    with pytest.raises(DataError, match="need at least 64"):
        collect(model, ["alphaone betatwo"], [CoActivation()], tokenizer=tok, progress=False)
    with pytest.raises(ConfigError, match="named alike"):
        collect(model, ["alphaone"], [Moments(), Moments()], tokenizer=tok, progress=False)
    with pytest.raises(DataError, match="labelled"):
        collect(model, ["alphaone betatwo"], [LabelSums(2)], tokenizer=tok, progress=False)


# ------------------------------------------------------------------------------------------ FFNs, interventions


def test_unknown_ffn_names_the_option(tmp_path):
    model, tok, _ = load_model(make_tiny_opt(tmp_path / "opt"))
    with pytest.raises(FFNNotFoundError, match="--ffn-modules"):
        find_ffns(model)
    ffns = find_ffns(model, OPT_FFN_MODULES)
    assert [f.up for f in ffns] == ["model.decoder.layers.0.fc1", "model.decoder.layers.1.fc1"]
    acts = collect(model, synthetic_corpus(2), [Moments()], tokenizer=tok, ffns=ffns, progress=False)
    assert float(acts.result(0, "moments")["positive_fraction"].max()) <= 1.0
    with pytest.raises(ConfigError, match="up= and down="):
        find_ffns(model, "up=model.decoder.layers.*.fc1")


def test_neuron_masks_equal_zeroed_down_columns(tiny):
    """Ablating neurons through the hook = deleting their W_down columns (an independent computation)."""
    model, tok, _ = tiny["llama"]
    batch = next(token_batches(tok, CalibrationData.of(synthetic_corpus(2)), max_length=16, batch_size=2, pack=True))
    keep = torch.rand(64, generator=torch.Generator().manual_seed(0)) > 0.5
    with torch.no_grad(), neuron_masks(model, {1: keep}):
        masked = model(**batch.inputs).logits
    down = model.model.layers[1].mlp.down_proj
    saved = down.weight.detach().clone()
    with torch.no_grad():
        down.weight[:, ~keep] = 0
        reference = model(**batch.inputs).logits
        down.weight.copy_(saved)
        dense = model(**batch.inputs).logits
    torch.testing.assert_close(masked, reference)
    assert not torch.allclose(masked, dense)
    mean = torch.randn(64)
    with torch.no_grad(), neuron_masks(model, {1: keep}, fill={1: mean}):  # mean ablation = bias change
        filled = model(**batch.inputs).logits
    with torch.no_grad():
        down.weight[:, ~keep] = 0
        down.bias = torch.nn.Parameter(saved[:, ~keep] @ mean[~keep])
        reference = model(**batch.inputs).logits
        down.weight.copy_(saved)
        down.bias = None
    torch.testing.assert_close(filled, reference)
    with pytest.raises(ConfigError, match="no FFN 7"), neuron_masks(model, {7: keep}):
        pass


def test_edit_neurons_and_scores(tiny):
    model, tok, _ = tiny["bert"]
    seen = []
    with torch.no_grad(), edit_neurons(model, lambda ffn, h: seen.append(ffn.index) or h):
        model(**tok(["alphaone"], return_tensors="pt"))
    assert seen == [0, 1]
    w = ffn_weights(model, find_ffns(model)[0])
    h = torch.randn(3, 64)
    torch.testing.assert_close(neuron_scores(h, w.down_norms(), "output"), h.abs() * w.down.norm(dim=0))
    with pytest.raises(ConfigError):
        neuron_scores(h, None, "bogus")


def test_perplexity_matches_loss(tiny):
    model, tok, _ = tiny["llama"]
    data = CalibrationData.of(synthetic_corpus(4))
    ppl = perplexity(model, tok, data, max_length=32, max_tokens=64)
    batch = next(token_batches(tok, data, max_length=32, batch_size=8, pack=True, max_tokens=64))
    with torch.no_grad():
        loss = model(**batch.inputs, labels=batch.inputs["input_ids"]).loss
    assert abs(ppl - float(torch.exp(loss))) < 1e-3 * ppl
    json.dumps({"ppl": ppl})


def test_hf_spec_parsing_offline_message_names_local_options(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="bbc"):
        load_calibration("someone/some-dataset:train:text")
