"""Texts tokenized once, batched on demand: what the analysers score and train on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class TokenizedTexts:
    """Texts tokenized once; batches are padded on demand (evaluation batches are sorted by length)."""

    def __init__(self, tokenizer: Any, texts: Sequence[str], max_length: int):
        self.tokenizer = tokenizer
        self.encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
        self.keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in self.encoded]

    def __len__(self) -> int:
        return len(self.encoded["input_ids"])

    def batch(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer.pad({k: [self.encoded[k][i] for i in rows] for k in self.keys}, return_tensors="pt"))

    def by_length(self, batch_size: int) -> list[list[int]]:
        order = sorted(range(len(self)), key=lambda i: -len(self.encoded["input_ids"][i]))
        return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
