"""Merging models whose vocabularies differ: rows of embedding-like tensors matched by token string.

With `tokenizer: {source: base | PATH}` the output uses that tokenizer. Every vocabulary-indexed tensor
(input embeddings, output head) of every input is rebuilt with one row per token of the output tokenizer:
the model's own row when it has the token; otherwise a fill (mergekit's rule): the row of the only model
that has the token, else the base's row, else the mean of the rows of the models that have it, else zeros.
The merge method then sees inputs of equal shape. Rows past the tokenizer (padding) are matched by index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posthoc.checkpoint import Checkpoint
from posthoc.compat import embedding_names
from posthoc.errors import IncompatibleError


def _vocabulary(ckpt: Checkpoint) -> dict[str, int]:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(ckpt.directory)).get_vocab()
    except Exception as error:  # transformers raises many kinds of errors for broken tokenizers
        raise IncompatibleError(
            f"{ckpt.source}: its tokenizer cannot be read ({error}); vocabularies cannot be aligned without it"
        ) from None


@dataclass
class VocabularyAlignment:
    rows: int
    names: set[str]
    index: dict[str, torch.Tensor]  # checkpoint source -> (rows,) source row of each output row, -1 if absent

    @classmethod
    def build(cls, donor: Checkpoint, reference: Checkpoint, checkpoints: list[Checkpoint]) -> VocabularyAlignment:
        target = _vocabulary(donor)
        tokens: list[str | None] = [None] * (max(target.values()) + 1 if target else 0)
        for token, i in target.items():
            tokens[i] = token
        names = set(embedding_names(reference))
        donor_rows = max((donor.tensors[n].shape[0] for n in names if n in donor.tensors), default=0)
        rows = max(len(tokens), donor_rows)
        index = {}
        for ckpt in checkpoints:
            vocab = _vocabulary(ckpt)
            own_rows = min((ckpt.tensors[n].shape[0] for n in names if n in ckpt.tensors), default=0)
            mapping = torch.full((rows,), -1, dtype=torch.long)
            for r in range(rows):
                token = tokens[r] if r < len(tokens) else None
                source = vocab.get(token, -1) if token is not None else r
                if 0 <= source < own_rows:
                    mapping[r] = source
            index[ckpt.source] = mapping
        return cls(rows, names, index)

    def covers(self, name: str) -> bool:
        return name in self.names

    def shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.rows, *shape[1:]) if name in self.names else shape

    def align(self, raw: dict[str, torch.Tensor], base_source: str | None) -> dict[str, torch.Tensor]:
        """Rebuild one vocabulary-indexed tensor of every input (keyed by checkpoint source)."""
        first = next(iter(raw.values()))
        trailing = first.shape[1:]
        total = torch.zeros((self.rows, *trailing), dtype=torch.float32)
        count = torch.zeros(self.rows, dtype=torch.long)
        gathered = {}
        for source, tensor in raw.items():
            mapping = self.index[source]
            have = mapping >= 0
            rows = torch.zeros((self.rows, *trailing), dtype=torch.float32)
            rows[have] = tensor[mapping[have]].to(torch.float32)
            total[have] += rows[have]
            count += have
            gathered[source] = (rows, have)
        fill = total / count.clamp(min=1).reshape(-1, *[1] * len(trailing))
        if base_source is not None:
            base_rows, base_have = gathered[base_source]
            use_base = base_have & (count >= 2)
            fill[use_base] = base_rows[use_base]
        aligned = {}
        for source, (rows, have) in gathered.items():
            rows[~have] = fill[~have]
            aligned[source] = rows.to(raw[source].dtype)
        return aligned
