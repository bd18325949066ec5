"""Subnetwork masks: the Gumbel-sigmoid kernel, masked models against manually zeroed weights, mask modules
applied and loaded by transformers, a language-model task, the CLI, and every bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from posthoc.cli import main
from tiny_text import CLASSES, VOCAB, make_tiny_bert, synthetic_corpus

from posthoc.analyse.evaluate import pooled_states
from posthoc.analyse.masks.masker import SubnetworkMasker, mask_iou, sample_hard_mask
from posthoc.analyse.masks.run import MaskTask, parse_task, split_mask
from posthoc.analyse.texts import TokenizedTexts
from posthoc.checkpoint import open_checkpoint, save_state_dict
from posthoc.data import stratified_split
from posthoc.errors import ConfigError, DataError
from posthoc.modules.masks import apply_mask, apply_to_tensor, load_masked, read_mask_module

FAST = {"steps": 4, "batch_size": 8, "max_length": 32, "threads": 1, "progress": False}


def test_hard_gumbel_sigmoid_is_binary_with_keep_probability_sigmoid_and_straight_through_gradient():
    logits = torch.tensor([-2.0, 0.0, 1.5]).repeat(20000, 1).requires_grad_(True)
    generator = torch.Generator().manual_seed(0)
    m = sample_hard_mask(logits, 1.0, generator)
    assert set(m.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(m.detach().mean(0), torch.sigmoid(torch.tensor([-2.0, 0.0, 1.5])), atol=0.01)
    # the gradient is that of the soft sample σ((l + g)/τ) drawn with the same noise
    m.sum().backward()
    u = torch.rand(logits.shape, generator=torch.Generator().manual_seed(0)).clamp_(1e-6, 1 - 1e-6)
    soft = torch.sigmoid(logits.detach() + torch.log(u) - torch.log1p(-u))
    assert torch.allclose(logits.grad, soft * (1 - soft), atol=1e-6)


def test_iou_by_hand():
    a = {"w": torch.tensor([[1, 1, 0, 0]], dtype=torch.bool), "v": torch.tensor([1, 0], dtype=torch.bool)}
    b = {"w": torch.tensor([[1, 0, 1, 0]], dtype=torch.bool), "v": torch.tensor([1, 1], dtype=torch.bool)}
    assert mask_iou(a, b) == pytest.approx(2 / 5)  # both: w0, v0; either: w0 w1 w2 v0 v1
    assert mask_iou(a, a) == 1.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("masks") / "base")


@pytest.fixture(scope="module")
def split():
    return stratified_split(synthetic_corpus(per_class=16), seed=0)


@pytest.fixture(scope="module")
def weight_mask(tiny, split) -> SubnetworkMasker:
    return SubnetworkMasker(alpha=1e-3, lr=0.5, init_logit=0.5, **FAST).fit(tiny, split.train)


def _pooled_manual(model, tok, texts, zero: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled states of a copy of `model` whose weights were multiplied by the given masks by hand."""
    import copy

    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in zero.items():
            clone.get_parameter(name).mul_(mask.to(torch.float32))
    batch = TokenizedTexts(tok, texts, 32).batch(list(range(len(texts))))
    with torch.no_grad():
        return pooled_states(clone, {}, batch)


def test_weight_mask_covers_every_block_linear_and_masks_exactly(weight_mask, split):
    m = weight_mask
    assert {t.role for t in m.targets_} == {"attention", "ffn_up", "ffn_down"} and len(m.targets_) == 2 * 6
    assert all(m.mask_[t.tensor].shape == t.shape for t in m.targets_)
    assert m.density_ < 0.9 and 0 <= m.density_ <= 1 and set(m.layer_density_) == {0, 1}
    kept = sum(int(v.sum()) for v in m.mask_.values())
    assert m.density_ == pytest.approx(kept / sum(t.size for t in m.targets_))
    texts = list(split.test.texts[:5])
    batch = TokenizedTexts(m.tokenizer_, texts, 32).batch(list(range(5)))
    for which, masks in (("mask", m.mask_), ("inverted", {k: ~v for k, v in m.mask_.items()})):
        with torch.no_grad():
            got = pooled_states(m.model_, m.masked_weights(which), batch)
        assert torch.allclose(got, _pooled_manual(m.model_, m.tokenizer_, texts, masks), atol=1e-5)
    full = m.score(split.test, "full")
    assert full == pytest.approx(m.head_.accuracy(
        pooled_states(m.model_, {}, TokenizedTexts(m.tokenizer_, split.test.texts, 32).batch(
            list(range(len(split.test))))), split.test.labels))


def test_weight_mask_module_applied_is_loaded_by_transformers(weight_mask, tiny, tmp_path):
    module = weight_mask.save(tmp_path / "mask", name="synthetic")
    manifest, masks = read_mask_module(module)
    assert manifest.kind == "mask" and manifest.tags["ones"] == "kept"
    assert set(manifest.tensors) == {t.tensor for t in weight_mask.targets_}
    for mode in ("keep", "remove"):
        out = apply_mask(tiny, module, tmp_path / mode, mode=mode, progress=False)
        with open_checkpoint(out) as pruned, open_checkpoint(tiny) as base:
            assert list(pruned.tensors) == list(base.tensors)
            for name in base.tensors:
                expected = base.read(name)
                if name in weight_mask.mask_:
                    keep = weight_mask.mask_[name] if mode == "keep" else ~weight_mask.mask_[name]
                    expected = expected * keep
                assert torch.equal(pruned.read(name), expected), name
        from transformers import AutoModel

        pruned_model = AutoModel.from_pretrained(out)
        loaded = load_masked(module, mode=mode)  # in memory, on the base its manifest names (posthoc.load)
        for name, value in pruned_model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], value), name
    with pytest.raises(Exception, match="mask mode 'drop' is unknown"):
        apply_mask(tiny, module, tmp_path / "x", mode="drop")
    with pytest.raises(Exception, match="mask mode 'drop' is unknown"):
        load_masked(module, mode="drop")
    moved = tmp_path / "moved"  # a module whose base is not where its manifest says
    shutil.copytree(module, moved)
    manifest = json.loads((moved / "module.json").read_text())
    manifest["base"]["source"] = str(tmp_path / "gone")
    (moved / "module.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="give base= .the model it masks."):
        load_masked(moved)
    assert load_masked(moved, base=tiny) is not None
    assert not (tmp_path / "x").exists()


def test_neuron_mask_equals_zeroed_columns_and_its_pruned_checkpoint(tiny, split, tmp_path):
    m = SubnetworkMasker(granularity="neuron", alpha=1e-2, lr=0.5, init_logit=0.5, **FAST).fit(tiny, split.train)
    assert [t.role for t in m.targets_] == ["ffn_neurons"] * 2 and m.targets_[0].shape == (1, 64)
    texts = list(split.test.texts[:4])
    zero = {t.tensor: m.mask_[t.tensor].expand(32, 64) for t in m.targets_}  # W_down columns
    batch = TokenizedTexts(m.tokenizer_, texts, 32).batch(list(range(4)))
    with torch.no_grad():
        masked = pooled_states(m.model_, m.masked_weights("mask"), batch)
    assert torch.allclose(masked, _pooled_manual(m.model_, m.tokenizer_, texts, zero), atol=1e-5)
    module = m.save(tmp_path / "neurons")
    manifest, stored = read_mask_module(module)
    assert set(stored) == {"ffn.0.neurons", "ffn.1.neurons"}
    assert manifest.tensors["encoder.layer.0.intermediate.dense.weight"] == {"mask": "ffn.0.neurons", "axis": 0}
    assert manifest.tensors["encoder.layer.1.output.dense.weight"] == {"mask": "ffn.1.neurons", "axis": 1}
    out = apply_mask(tiny, module, tmp_path / "pruned", progress=False)
    from transformers import AutoModel

    pruned = AutoModel.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.allclose(pooled_states(pruned, {}, batch), masked, atol=1e-5)


def test_apply_to_tensor_axis():
    t = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(apply_to_tensor(t, torch.tensor([True, False, True]), 1), torch.tensor([[0, 0, 2], [3, 0, 5.0]]))
    assert torch.equal(apply_to_tensor(t, torch.tensor([True, False]), 0, "remove"), torch.tensor([[0, 0, 0], [3, 4, 5.0]]))


def test_masks_learn_to_drop_what_the_task_does_not_need(tiny, split):
    """A large α empties the FFNs while the task keeps its accuracy (this tiny model classifies from its
    embeddings), a tiny α keeps almost everything: density follows α as the loss says."""
    loose = SubnetworkMasker(granularity="neuron", alpha=1e-1, lr=0.2, steps=40, batch_size=8, max_length=32,
                             threads=1, progress=False).fit(tiny, split.train)
    tight = SubnetworkMasker(granularity="neuron", alpha=1e-7, lr=0.2, steps=40, batch_size=8, max_length=32,
                             threads=1, progress=False, head=loose.head_).fit(tiny, split.train)
    assert loose.density_ < 0.2 < 0.8 < tight.density_
    assert loose.score(split.test, "mask") >= loose.score(split.test, "full") - 0.1


def _tiny_llama(directory: Path) -> Path:
    from transformers import BertTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         architectures=["LlamaForCausalLM"], pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    save_state_dict(model.state_dict(), directory, config=config.to_dict())
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(directory)
    return directory


def test_language_model_task_scores_the_mean_token_loss(tmp_path, split):
    llama = _tiny_llama(tmp_path / "llama")
    texts = list(split.train.texts[:24])
    m = SubnetworkMasker(**FAST).fit(llama, texts)
    assert m.task_ == "lm" and m.metric_ == "loss" and {t.role for t in m.targets_} >= {"ffn_gate", "attention"}
    held_out = list(split.test.texts[:5])
    tok = m.tokenizer_
    total, count = 0.0, 0
    with torch.no_grad():
        for text in held_out:  # independent: one text at a time, transformers' own shifted loss
            ids = tok(text, truncation=True, max_length=32, return_tensors="pt")["input_ids"]
            total += float(m.model_(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert m.score(held_out, "full") == pytest.approx(total / count, rel=1e-5)
    assert m.score(held_out, "inverted") != m.score(held_out, "full")


def test_bad_input(tiny, split):
    with pytest.raises(ConfigError, match=r"The 'alpha' parameter of SubnetworkMasker must be None or a number > 0\. "
                                          r"Got 0 instead\."):
        SubnetworkMasker(alpha=0, **FAST).fit(tiny, split.train)
    with pytest.raises(ConfigError, match="Got -1e-05 instead"):
        SubnetworkMasker(alpha=-1e-5, **FAST).fit(tiny, split.train)
    one_class = split.train.subset(["alpha"])
    with pytest.raises(DataError, match="needs examples of at least 2 classes; found only"):
        SubnetworkMasker(**FAST).fit(tiny, one_class)
    with pytest.raises(DataError, match="no examples to learn a mask on"):
        SubnetworkMasker(**FAST).fit(tiny, split.train.select([]))
    with pytest.raises(DataError, match="at least one non-empty text"):
        SubnetworkMasker(**FAST).fit(tiny, ["", "  "])
    with pytest.raises(ConfigError, match="not a causal language model"):
        SubnetworkMasker(**FAST).fit(tiny, ["some text here"])
    with pytest.raises(ConfigError, match="has no parameter 'density'"):
        SubnetworkMasker(density=0.1)
    with pytest.raises(ConfigError, match="not fitted yet"):
        SubnetworkMasker().score(split.test)


def _folders(root: Path, classes=CLASSES, per_class: int = 16) -> Path:
    data = synthetic_corpus(per_class=per_class)
    for i, (text, y) in enumerate(zip(data.texts, data.labels)):
        if data.label_names[y] in classes:
            (root / data.label_names[y]).mkdir(parents=True, exist_ok=True)
            (root / data.label_names[y] / f"{i:03d}.txt").write_text(text)
    return root


def test_parse_task_picks_classes(tmp_path):
    data = _folders(tmp_path / "d")
    task = parse_task(f"folders:{data}:alpha,beta", train_per_class=5, test_per_class=3)
    assert task.name == "alpha+beta" and task.train.label_names == ("alpha", "beta") and len(task.train) == 10
    whole = parse_task(f"folders:{data}")
    assert whole.train.label_names == tuple(sorted(CLASSES))  # folder names, sorted
    with pytest.raises(DataError, match="no class 'zeta'"):
        parse_task(f"folders:{data}:alpha,zeta")


def test_split_mask_two_tasks_iou_and_pruned(tiny, tmp_path):
    data = _folders(tmp_path / "d")
    tasks = [parse_task(f"folders:{data}:{c}", train_per_class=8, test_per_class=4)
             for c in ("alpha,beta,gamma", "delta,epsilon")]
    results = split_mask(tiny, tmp_path / "out", tasks, pruned=True, progress=False, steps=4, batch_size=8,
                         max_length=32, threads=1, alpha=1e-3, lr=0.5)
    summary = json.loads((tmp_path / "out" / "masks.json").read_text())
    (pair, iou), = summary["iou"].items()
    assert iou["all"] == pytest.approx(mask_iou(results[0].masker.mask_, results[1].masker.mask_))
    assert set(iou["by_layer"]) == {"0", "1"}
    for r in results:
        assert (tmp_path / "out" / "masks" / r.task.name / "module.json").is_file()
        assert (tmp_path / "out" / "pruned" / r.task.name / "config.json").is_file()
    assert (tmp_path / "out" / "report.html").is_file() and (tmp_path / "out" / "density.png").is_file()
    with pytest.raises(DataError, match="same name"):
        split_mask(tiny, tmp_path / "out2", [tasks[0], tasks[0]], **FAST)
    assert not (tmp_path / "out2").exists()


def test_cli_mask_and_bad_input(tiny, tmp_path):
    data = _folders(tmp_path / "d")
    runner = CliRunner()
    out = tmp_path / "out"
    args = ["split", "mask", str(tiny), str(out), "--steps", "3", "--max-length", "32", "--batch-size", "8",
            "--train-per-class", "6", "--test-per-class", "3", "--quiet"]
    result = runner.invoke(main, [*args, "--task", f"folders:{data}:alpha,beta", "--granularity", "neuron"])
    assert result.exit_code == 0, result.output
    assert "alpha+beta: density" in result.output and (out / "masks" / "alpha+beta" / "module.json").is_file()
    bad = tmp_path / "bad"
    for extra, message in ((["--alpha", "0"], "'alpha' parameter"), (["--alpha", "-1"], "'alpha' parameter")):
        result = runner.invoke(main, [*args[:3], str(bad), *args[4:], "--task", f"folders:{data}:alpha,beta", *extra])
        assert result.exit_code == 2 and message in result.output and result.output.count("\n") == 1
        assert not bad.exists()
    one = _folders(tmp_path / "one", classes=("alpha",))
    result = runner.invoke(main, [*args[:3], str(bad), *args[4:], "--task", f"folders:{one}"])
    assert result.exit_code == 2 and "at least 2 classes" in result.output and not bad.exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    result = runner.invoke(main, [*args[:3], str(bad), *args[4:], "--task", str(empty)])
    assert result.exit_code == 2 and "holds no text" in result.output and not bad.exists()
    # a given head (e.g. the one fine-tuned with the task) keeps its function; its classes must be the task's
    from posthoc.finetune import ClassificationHead

    head = tmp_path / "head"
    head.mkdir()
    ClassificationHead(32, ("alpha", "beta")).save(head)
    result = runner.invoke(main, [*args[:3], str(tmp_path / "with-head"), *args[4:], "--task",
                                  f"folders:{data}:alpha,beta", "--head", str(head)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, [*args[:3], str(bad), *args[4:], "--task", f"folders:{data}:alpha,gamma",
                                  "--head", str(head)])
    assert result.exit_code == 2 and "the head predicts ['alpha', 'beta']" in result.output and not bad.exists()


def test_mask_task_dataclass_is_plain():
    task = MaskTask("t", ["a"], ["b"])
    assert task.name == "t"


@pytest.mark.real
def test_minilm_neuron_mask_on_two_bbc_topics(tmp_path):
    """all-MiniLM-L6-v2, sports vs tech: a short neuron mask, its module applied, loaded by transformers,
    gives the masked model's embeddings."""
    from transformers import AutoModel

    from posthoc.assets import minilm_dir
    from posthoc.data import load_bbc

    data = stratified_split(load_bbc(), seed=0)
    train = data.train.subset(["sports", "tech"]).limit_per_class(12)
    m = SubnetworkMasker(granularity="neuron", steps=6, batch_size=8, max_length=32, lr=0.5, alpha=1e-3,
                         progress=False).fit(minilm_dir(), train)
    assert m.targets_[0].shape == (1, 1536) and len(m.targets_) == 6
    module = m.save(tmp_path / "mask", name="sports+tech")
    pruned = AutoModel.from_pretrained(apply_mask(minilm_dir(), module, tmp_path / "pruned", progress=False)).eval()
    batch = TokenizedTexts(m.tokenizer_, train.texts[:4], 32).batch([0, 1, 2, 3])
    with torch.no_grad():
        assert torch.allclose(pooled_states(pruned, {}, batch), pooled_states(m.model_, m.masked_weights("mask"), batch),
                              atol=1e-4)
    assert 0 <= m.score(data.test.subset(["sports", "tech"]).limit_per_class(10), "mask") <= 1
