"""A tiny random BERT with its own WordPiece vocabulary, and a synthetic labelled corpus it can learn.

Shared by the fine-tuning and demo tests. The corpus has five classes, each with its own words mixed
with common ones, so a few dozen steps of a 2-layer, hidden-32 encoder separate them.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from posthoc.checkpoint import save_state_dict
from posthoc.data import TextClassificationData

CLASSES = ("alpha", "beta", "gamma", "delta", "epsilon")
COMMON = ("the", "a", "of", "and", "to", "in", "is", "it", "was", "for", "on", "with")
CLASS_WORDS = {
    name: tuple(f"{name}{suffix}" for suffix in ("one", "two", "three", "four", "five", "six")) for name in CLASSES
}
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCAB = (*SPECIAL, *COMMON, *(w for words in CLASS_WORDS.values() for w in words))


def synthetic_corpus(per_class: int = 40, seed: int = 0) -> TextClassificationData:
    """Texts of 8–14 words: about half from the class's own words, the rest common words."""
    rng = random.Random(seed)
    texts, labels = [], []
    for label, name in enumerate(CLASSES):
        for _ in range(per_class):
            words = [
                rng.choice(CLASS_WORDS[name]) if rng.random() < 0.5 else rng.choice(COMMON)
                for _ in range(rng.randint(8, 14))
            ]
            texts.append(" ".join(words))
            labels.append(label)
    return TextClassificationData(tuple(texts), tuple(labels), CLASSES, "synthetic")


def make_tiny_bert(directory: Path, seed: int = 0) -> Path:
    """A random BertModel (hidden 32, 2 layers) saved like all-MiniLM-L6-v2: with its position_ids buffer.

    transformers no longer saves `embeddings.position_ids`, but older checkpoints (MiniLM among them)
    hold it; keeping it here checks that a fine-tune writes back every tensor the base has.
    """
    from transformers import BertConfig, BertModel, BertTokenizer

    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        architectures=["BertModel"],
    )
    torch.manual_seed(seed)
    model = BertModel(config).eval()
    state = {"embeddings.position_ids": torch.arange(64).unsqueeze(0), **model.state_dict()}
    save_state_dict(state, directory, config=config.to_dict())
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(directory)
    return directory
