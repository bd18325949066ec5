"""Load a model for analysis, and score it: perplexity for decoders, sentence embeddings for encoders.

Shared by every analyser, so an MoE model, a masked model and the dense model are scored the same way.
Run any of these inside `neuron_masks(...)` / `edit_neurons(...)` to score an intervened model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from posthoc.analyse.calibration import CalibrationData, is_causal_lm, token_batches
from posthoc.errors import CheckpointError


def load_model(spec: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any, Path]:
    """(model, tokenizer, directory) for a checkpoint spec (directory, GGUF file, hub id), in eval mode.

    The class is the checkpoint's `architectures[0]` (BertModel, LlamaForCausalLM …), so a causal LM keeps
    its LM head; GGUF files are dequantised once into posthoc's cache by `open_checkpoint`.
    """
    import transformers
    from transformers.utils import logging as hf_logging

    from posthoc.checkpoint import open_checkpoint

    with open_checkpoint(spec) as ckpt:
        directory, archs = ckpt.directory, ckpt.config.get("architectures") or []
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{spec}: no config.json; analysers need a Hugging Face model directory")
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), transformers.AutoModel)
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(directory, dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{spec}: transformers cannot load it ({first})") from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer, directory


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
        from posthoc.errors import DataError

        raise DataError("perplexity: the evaluation text gave no token pairs")
    return math.exp(total / count)


def sentence_embeddings(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], *, max_length: int = 128, batch_size: int = 32
) -> torch.Tensor:
    """Mean-pooled last hidden states (texts, hidden), the way `posthoc.finetune.Encoder` pools."""
    from posthoc.finetune import Encoder

    return Encoder(model, tokenizer).embed(list(texts), max_length=max_length, batch_size=batch_size, threads=torch.get_num_threads())


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows."""
    return float(nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean())


def quality_kind(model: nn.Module) -> str:
    """'perplexity' for causal LMs, 'embedding' for encoders."""
    return "perplexity" if is_causal_lm(model) else "embedding"
