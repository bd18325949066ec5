"""Load a model for analysis, and score it: perplexity for decoders, sentence embeddings for encoders.

Shared by every analyser, so an MoE model, a masked model and the dense model are scored the same way.
Run any of these inside `neuron_masks(...)` / `edit_neurons(...)` to score an intervened model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from posthoc.analyse.calibration import CalibrationData, is_causal_lm, token_batches
from posthoc.errors import DataError
from posthoc.models import Encoder, mean_pool


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    tokenizer: Any,
    data: Any,
    *,
    max_length: int = 256,
    batch_size: int = 8,
    max_tokens: int | None = 16_384,
) -> float:
    """exp(mean next-token cross-entropy) on packed sequences of `data` (a causal LM)."""
    total, count = 0.0, 0
    for batch in token_batches(tokenizer, CalibrationData.of(data), max_length=max_length, batch_size=batch_size,
                               pack=True, max_tokens=max_tokens):
        ids = batch.inputs["input_ids"]
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += ids[:, 1:].numel()
    if count == 0:
        raise DataError("perplexity: the evaluation text gave no token pairs")
    return math.exp(total / count)


def sentence_embeddings(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], *, max_length: int = 128, batch_size: int = 32
) -> torch.Tensor:
    """Mean-pooled last hidden states (texts, hidden), the way `posthoc.models.Encoder` pools."""
    return Encoder(model, tokenizer).embed(list(texts), max_length=max_length, batch_size=batch_size, threads=torch.get_num_threads())


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows."""
    return float(nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean())


def quality_kind(model: nn.Module) -> str:
    """'perplexity' for causal LMs, 'embedding' for encoders."""
    return "perplexity" if is_causal_lm(model) else "embedding"


def pooled_states(model: nn.Module, params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled last hidden states of `model` with `params` substituted: (batch, hidden).

    Encoders pool `last_hidden_state` (as `posthoc.models.Encoder`); causal LMs their last hidden layer."""
    if is_causal_lm(model):
        batch = {k: v for k, v in batch.items() if k != "token_type_ids"}
        out = functional_call(model, params, args=(), kwargs={**batch, "output_hidden_states": True})
        hidden = out.hidden_states[-1]
    else:
        hidden = functional_call(model, params, args=(), kwargs=batch).last_hidden_state  # (batch, tokens, hidden)
    return mean_pool(hidden, batch["attention_mask"])
