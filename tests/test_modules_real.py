"""Modules of a real fine-tune of the packaged all-MiniLM-L6-v2 (a short one: a real task vector, quickly)."""

from __future__ import annotations

import json

import pytest
import torch

from posthoc.assets import minilm_dir
from posthoc.data import load_bbc, stratified_split
from posthoc.finetune import ClassificationHead, FinetuneSettings, finetune
from posthoc.models import Encoder
from posthoc.modules.apply import stack
from posthoc.modules.extraction import extract


@pytest.fixture(scope="module")
def minilm_finetune(tmp_path_factory):
    root = tmp_path_factory.mktemp("minilm_modules")
    data = load_bbc()
    split = stratified_split(data, validation=0.1, test=0.2, seed=0).subset(("business", "sports", "tech"))
    settings = FinetuneSettings(steps=12, batch_size=8, max_length=64)
    finetune(minilm_dir(), split.train, root / "tuned", settings=settings, threads=2, progress=False)
    texts = split.validation.limit_per_class(6)
    return root, texts


@pytest.mark.real
def test_minilm_lora_and_sparse_modules(minilm_finetune):
    root, texts = minilm_finetune
    base = minilm_dir()
    calib = root / "calib.txt"
    calib.write_text("\n".join(t.replace("\n", " ") for t in texts.texts) + "\n")
    lora = extract(base, root / "tuned", root / "lora", kind="lora", rank=8, calib=calib, max_length=64, progress=False)
    sparse = extract(base, root / "tuned", root / "sparse", kind="sparse", density=0.05, progress=False)
    # fidelity figures are real numbers in range, the sparse module is the smaller and the more faithful here
    assert 0 < lora.energy_kept < 1 and 0 < sparse.energy_kept < 1
    assert sum(t.nnz for t in sparse.tensors) == int(0.05 * sum(i.numel for i in _infos(base)))
    assert lora.calibration["hidden_cosine_mean"] > 0.9 and 0 <= lora.calibration["label_agreement"] <= 1
    assert json.loads((root / "lora" / "fidelity.json").read_text())["calibration"]["label_source"] == "posthoc task head"

    # stacked back: a checkpoint transformers loads; PEFT gives the same logits (≤ 1e-4)
    stacked = stack(base, [root / "lora"], root / "stacked", progress=False).out_dir
    head = ClassificationHead.load(root / "tuned")
    ours = Encoder.load(stacked).embed(texts.texts, max_length=64)
    from peft import PeftModel

    encoder = Encoder.load(base)
    encoder.model = PeftModel.from_pretrained(encoder.model, root / "lora").eval()
    theirs = encoder.embed(texts.texts, max_length=64)
    with torch.no_grad():
        assert float((head(ours) - head(theirs)).abs().max()) <= 1e-4


def _infos(directory):
    from posthoc.checkpoint import open_checkpoint

    with open_checkpoint(directory) as ckpt:
        return [i for i in ckpt.tensors.values() if i.dtype.is_floating_point]
