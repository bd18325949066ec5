"""Language-model objectives for `posthoc.finetune`, and sparse fine-tuning (LT-SFT) on top of any objective.

- `MaskedLMObjective`: BERT's masked-LM loss on plain text, for adapting an encoder to a language. Encoders
  such as multilingual-e5 ship without an MLM head, so the objective brings its own (dense + GELU +
  LayerNorm, output tied to the encoder's input embeddings, plus a bias), trains it next to the encoder
  and saves it beside it (`mlm_head.safetensors`); like a task head, it is never part of a module.
- `CausalLMObjective`: next-token loss on plain text, for decoder LMs (Llama, SmolLM2).
- `TranslationAlignObjective`: "make monolingual sentence embeddings multilingual" (Reimers & Gurevych,
  2020) on parallel text: the encoder being trained (the student), given a translation, is pulled to the
  frozen base's (the teacher's) mean-pooled embedding of its source sentence. A language module trained so
  maps its language onto the base's space for the pivot language (English), where a task module is trained.
- `sparse_finetune`: LT-SFT (Ansell et al., 2022). Fine-tune fully, keep the `density` fraction of the
  trainable entries that moved most (|θ₁ − θ₀|, one threshold over all trainable tensors), reset to θ₀ and
  fine-tune only those entries. The output differs from the base in at most that many entries: a sparse
  module extracted from it is exact.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from posthoc.checkpoint import open_checkpoint
from posthoc.errors import ConfigError, DataError
from posthoc.finetune import FinetuneResult, FinetuneSettings, Objective, finetune
from posthoc.models import Encoder, mean_pool

log = logging.getLogger(__name__)

MLM_HEAD = "mlm_head.safetensors"


class MaskedLMHead(nn.Module):
    """hidden -> dense -> GELU -> LayerNorm -> logits over the vocabulary (output weights = input embeddings)."""

    def __init__(self, embeddings: nn.Embedding, eps: float = 1e-12):
        super().__init__()
        hidden = embeddings.embedding_dim
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.bias = nn.Parameter(torch.zeros(embeddings.num_embeddings))
        self._embeddings = [embeddings]  # a list, so the tied matrix is not registered as the head's own

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(positions, hidden) -> (positions, vocabulary)."""
        x = self.norm(nn.functional.gelu(self.dense(hidden)))
        return x @ self._embeddings[0].weight.T + self.bias


class MaskedLMObjective:
    """Mask `mask_probability` of the tokens (80 % [MASK], 10 % random, 10 % kept) and predict them.

    `vocabulary="corpus"` scores the masked positions against the pieces that occur in the texts only (a
    softmax over the corpus's own vocabulary, every target included), not the whole vocabulary: for
    multilingual-e5 (250 k pieces, ~10 k in one language's Debian messages) the output layer is then a
    small part of a step instead of most of it. The random replacements are drawn from the same pieces.
    """

    name = "masked_lm"
    auto_class = "AutoModel"

    def __init__(
        self,
        texts: Sequence[str],
        *,
        mask_probability: float = 0.15,
        seed: int = 0,
        name: str = "text",
        vocabulary: str = "full",
    ):
        if not texts:
            raise DataError(f"{name}: no texts to adapt to")
        if not 0 < mask_probability < 1:
            raise ConfigError(f"The 'mask_probability' of masked_lm must be in (0, 1). Got {mask_probability} instead.")
        if vocabulary not in ("full", "corpus"):
            raise ConfigError(f"The 'vocabulary' of masked_lm must be 'full' or 'corpus'. Got {vocabulary!r} instead.")
        self.texts = list(texts)
        self.mask_probability = mask_probability
        self.seed = seed
        self.data_name = name
        self.vocabulary = vocabulary
        self.head: MaskedLMHead | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self._pieces: torch.Tensor | None = None  # (pieces,) vocabulary ids scored, or None: all
        self._position: torch.Tensor | None = None  # (vocabulary,) id -> its index in _pieces

    def __len__(self) -> int:
        return len(self.texts)

    def build(self, model: nn.Module, tokenizer: Any) -> nn.Module:
        if tokenizer.mask_token_id is None:
            raise ConfigError("masked_lm needs a tokenizer with a mask token")
        eps = float(getattr(model.config, "layer_norm_eps", 1e-12))
        self.head = MaskedLMHead(model.get_input_embeddings(), eps)
        self._generator = torch.Generator().manual_seed(self.seed)  # the same masks whenever it is rebuilt
        if self.vocabulary == "corpus":
            ids = tokenizer(self.texts, add_special_tokens=False, verbose=False)["input_ids"]  # long texts: no warning
            self._pieces = torch.tensor(sorted({i for row in ids for i in row}), dtype=torch.long)
            self._position = torch.full((self.head.bias.numel(),), -1, dtype=torch.long)
            self._position[self._pieces] = torch.arange(len(self._pieces))
        return self.head

    def loss(self, model: nn.Module, tokenizer: Any, indices: Sequence[int], max_length: int) -> torch.Tensor:
        batch = tokenizer([self.texts[i] for i in indices], truncation=True, max_length=max_length, padding=True,
                          return_tensors="pt", return_special_tokens_mask=True)  # fmt: skip
        ids = batch["input_ids"]  # (batch, tokens)
        candidates = (batch.pop("special_tokens_mask") == 0) & (batch["attention_mask"] == 1)
        draw = torch.rand(ids.shape, generator=self._generator)
        masked = candidates & (draw < self.mask_probability)
        if not masked.any():  # a batch of very short texts: mask one token anyway
            first = candidates.nonzero()[0]
            masked[first[0], first[1]] = True
        action = torch.rand(ids.shape, generator=self._generator)
        corrupted = ids.clone()
        corrupted[masked & (action < 0.8)] = tokenizer.mask_token_id
        swap = masked & (action >= 0.8) & (action < 0.9)
        if self._pieces is None:
            corrupted[swap] = torch.randint(len(tokenizer), (int(swap.sum()),), generator=self._generator)
        else:
            draw = torch.randint(len(self._pieces), (int(swap.sum()),), generator=self._generator)
            corrupted[swap] = self._pieces[draw]
        batch["input_ids"] = corrupted
        hidden = model(**batch).last_hidden_state  # (batch, tokens, hidden)
        if self._pieces is None:
            logits = self.head(hidden[masked])  # (masked positions, vocabulary)
            return nn.functional.cross_entropy(logits, ids[masked])
        return nn.functional.cross_entropy(self._corpus_logits(hidden[masked]), self._position[ids[masked]])

    def _corpus_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(positions, hidden) -> (positions, corpus pieces): the head's output restricted to `_pieces`."""
        head = self.head
        x = head.norm(nn.functional.gelu(head.dense(hidden)))
        return x @ head._embeddings[0].weight[self._pieces].T + head.bias[self._pieces]

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous() for k, v in self.head.state_dict().items()}
        save_file(tensors, str(directory / MLM_HEAD), metadata={"format": "pt"})

    def describe(self) -> dict[str, Any]:
        return {"objective": self.name, "data": self.data_name, "examples": len(self.texts),
                "mask_probability": self.mask_probability, "vocabulary": self.vocabulary,
                "pieces_scored": None if self._pieces is None else len(self._pieces)}  # fmt: skip


class CausalLMObjective:
    """Next-token cross-entropy on plain texts (padding ignored)."""

    name = "causal_lm"
    auto_class = "AutoModelForCausalLM"

    def __init__(self, texts: Sequence[str], *, name: str = "text"):
        if not texts:
            raise DataError(f"{name}: no texts to train on")
        self.texts = list(texts)
        self.data_name = name

    def __len__(self) -> int:
        return len(self.texts)

    def build(self, model: nn.Module, tokenizer: Any) -> nn.Module:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return nn.Module()  # no parameters of its own

    def loss(self, model: nn.Module, tokenizer: Any, indices: Sequence[int], max_length: int) -> torch.Tensor:
        batch = tokenizer([self.texts[i] for i in indices], truncation=True, max_length=max_length, padding=True,
                          return_tensors="pt")  # fmt: skip
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return model(**batch, labels=labels).loss

    def save(self, directory: Path) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"objective": self.name, "data": self.data_name, "examples": len(self.texts)}


class TranslationAlignObjective:
    """Mean squared distance between the student's embedding of a translation and the teacher's of its source.

    texts[i] is a translation of pivots[i]. The teacher is the model as the first `build` receives it (the
    base, before any step): the pivots' mean-pooled embeddings are computed there, in eval mode, truncated
    at `max_length` (pass the fine-tune's own), and kept, so the target of every step is the base's
    embedding of the source, shape (len(texts), hidden). Both phases of LT-SFT start from the same base:
    give `sparse_finetune` the same objective twice and the teacher runs once. `pivot_weight` > 0 adds the same distance for the
    student's embedding of the pivot itself (keeps the pivot language where it was; one more forward and
    backward pass per step). No parameters of its own: nothing is saved beside the encoder.
    """

    name = "align"
    auto_class = "AutoModel"

    def __init__(
        self,
        texts: Sequence[str],
        pivots: Sequence[str],
        *,
        max_length: int = 128,
        pivot_weight: float = 0.0,
        name: str = "text",
    ):
        if not texts:
            raise DataError(f"{name}: no translated texts to align")
        if len(texts) != len(pivots):
            raise DataError(f"{name}: {len(texts)} translations but {len(pivots)} source texts; align needs pairs")
        if not pivot_weight >= 0:
            raise ConfigError(f"The 'pivot_weight' of align must be a float >= 0. Got {pivot_weight} instead.")
        self.texts = list(texts)
        self.pivots = list(pivots)
        self.max_length = max_length
        self.pivot_weight = float(pivot_weight)
        self.data_name = name
        self.targets: torch.Tensor | None = None  # (texts, hidden): the teacher's embeddings of the pivots

    def __len__(self) -> int:
        return len(self.texts)

    def build(self, model: nn.Module, tokenizer: Any) -> nn.Module:
        if self.targets is None:
            teacher = Encoder(model, tokenizer)  # embed() runs it in eval mode, without gradients, and restores
            self.targets = teacher.embed(self.pivots, max_length=self.max_length, threads=torch.get_num_threads())
        return nn.Module()

    def loss(self, model: nn.Module, tokenizer: Any, indices: Sequence[int], max_length: int) -> torch.Tensor:
        target = self.targets[list(indices)]  # (batch, hidden)
        loss = nn.functional.mse_loss(self._embed(model, tokenizer, [self.texts[i] for i in indices], max_length), target)
        if self.pivot_weight > 0:
            pivots = self._embed(model, tokenizer, [self.pivots[i] for i in indices], max_length)
            loss = loss + self.pivot_weight * nn.functional.mse_loss(pivots, target)
        return loss

    @staticmethod
    def _embed(model: nn.Module, tokenizer: Any, texts: list[str], max_length: int) -> torch.Tensor:
        batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        return mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])  # (batch, hidden)

    def save(self, directory: Path) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"objective": self.name, "data": self.data_name, "examples": len(self.texts),
                "pivot_weight": self.pivot_weight, "teacher_max_length": self.max_length}  # fmt: skip


# ------------------------------------------------------------------------------------------------ LT-SFT


def top_change_masks(
    base_dir: str | os.PathLike[str], tuned_dir: str | os.PathLike[str], names: Sequence[str], density: float
) -> dict[str, torch.Tensor]:
    """Masks of the `density` fraction of entries (over all `names` together) with the largest |tuned − base|."""
    if not 0 < density <= 1:
        raise ConfigError(f"The 'density' of sparse fine-tuning must be in (0, 1]. Got {density} instead.")
    with open_checkpoint(base_dir) as base, open_checkpoint(tuned_dir) as tuned:
        deltas = {n: (tuned.read(n).float() - base.read(n).float()).abs() for n in names}
    total = sum(d.numel() for d in deltas.values())
    keep = max(1, int(density * total))
    flat = torch.cat([d.reshape(-1) for d in deltas.values()])
    threshold = torch.kthvalue(flat, total - keep + 1).values if keep < total else flat.min() - 1
    del flat
    masks = {n: d >= threshold for n, d in deltas.items()}
    excess = sum(int(m.sum()) for m in masks.values()) - keep
    if excess > 0:  # ties at the threshold: drop the extra ones, last tensors first
        for n in reversed(list(masks)):
            at = (masks[n] & (deltas[n] == threshold)).reshape(-1).nonzero().flatten()
            drop = at[-min(excess, len(at)) :] if len(at) else at
            masks[n].view(-1)[drop] = False
            excess -= len(drop)
            if excess <= 0:
                break
    return masks


def sparse_finetune(
    base_dir: str | os.PathLike[str],
    make_objective: Callable[[], Objective],
    out_dir: str | os.PathLike[str],
    *,
    density: float,
    settings: FinetuneSettings | None = None,
    sparse_steps: int | None = None,
    trainable: Callable[[str], bool] | None = None,
    threads: int | None = None,
    force: bool = False,
    progress: bool = False,
    name: str | None = None,
    extra_record: dict[str, Any] | None = None,
) -> FinetuneResult:
    """LT-SFT: full fine-tune, pick the top-`density` changed entries, reset, fine-tune only those.

    `make_objective` builds a fresh objective for each phase (a new head each time). `trainable` limits
    both phases and the selection to some parameters (e.g. the transformer layers, not the embeddings).
    Phase 1's checkpoint is written next to `out_dir` and removed once the masks are taken.
    """
    settings = settings or FinetuneSettings()
    out_dir = Path(out_dir)
    phase1 = out_dir.parent / f".{out_dir.name}.phase1"
    first = finetune(base_dir, make_objective(), phase1, settings=settings, trainable=trainable, threads=threads,
                     force=True, progress=progress, name=f"{name or 'sparse'} (phase 1)")  # fmt: skip
    with open_checkpoint(base_dir) as base:
        floating = [n for n, info in base.tensors.items() if info.dtype.is_floating_point]
    names = [n for n in floating if trainable is None or trainable(n)]
    try:
        masks = top_change_masks(base_dir, phase1, names, density)
    finally:
        shutil.rmtree(phase1, ignore_errors=True)
    phase2 = replace(settings, steps=sparse_steps or settings.steps)
    record = {**(extra_record or {}), "lt_sft": {"density": density, "phase1_losses": first.losses,
                                                 "phase1_seconds": round(first.seconds, 2)}}  # fmt: skip
    result = finetune(base_dir, make_objective(), out_dir, settings=phase2, masks=masks, threads=threads,
                      force=force, progress=progress, name=name, extra_record=record)  # fmt: skip
    result.seconds += first.seconds
    return result
