"""The one transformers loader, and encoders: a checkpoint in, (model, tokenizer) out; texts in, mean-pooled embeddings out."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from posthoc.checkpoint import open_checkpoint
from posthoc.errors import CheckpointError
from posthoc.progress import progress_bar
from posthoc.threads import torch_threads


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states that are not padding: (batch, tokens, hidden) -> (batch, hidden)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, tokens, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class Encoder:
    """A loaded encoder with its tokenizer: texts in, mean-pooled embeddings out.

    The one place texts become vectors, so the demo, evaluation and later analysers (activations,
    clustering) pool in the same way.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, directory: Path | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.directory = directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Encoder:
        """Load with transformers (AutoModel + AutoTokenizer), in float32, in eval mode."""
        model, tokenizer, _ = load_model(directory, auto_class="AutoModel")
        return cls(model, tokenizer, Path(directory))

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def embed(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 64,
        max_length: int = 128,
        threads: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Mean-pooled last hidden states, (len(texts), hidden), float32, in the order of `texts`.

        Texts are batched by length (then put back in order) so little compute goes to padding.
        """
        if not texts:
            return torch.zeros(0, self.hidden_size)
        encoded = self.tokenizer(list(texts), truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
        order = sorted(range(len(texts)), key=lambda i: -len(encoded["input_ids"][i]))
        out = torch.empty(len(texts), self.hidden_size)
        was_training = self.model.training
        self.model.eval()
        try:
            with (
                progress_bar(len(texts), "embed", "text", enabled=progress) as bar,
                torch_threads(threads),
                torch.inference_mode(),
            ):
                bar.leave = False  # a step of a larger job: gone once done
                for start in range(0, len(order), batch_size):
                    rows = order[start : start + batch_size]
                    batch = self.tokenizer.pad({k: [encoded[k][i] for i in rows] for k in keys}, return_tensors="pt")
                    hidden = self.model(**batch).last_hidden_state  # (batch, tokens, hidden)
                    out[rows] = mean_pool(hidden, batch["attention_mask"]).float()
                    bar.update(len(rows))
        finally:
            self.model.train(was_training)
        return out


def embed_texts(encoder_dir: str | os.PathLike[str], texts: Sequence[str], **kwargs: Any) -> torch.Tensor:
    """Load an encoder and embed texts (see `Encoder.embed` for the keyword arguments)."""
    return Encoder.load(encoder_dir).embed(texts, **kwargs)


def load_model(
    spec: str | os.PathLike[str], *, auto_class: str | None = None, dtype: torch.dtype = torch.float32,
    with_tokenizer: bool = True,
) -> tuple[nn.Module, Any, Path]:
    """(model, tokenizer, directory) for a checkpoint spec (directory, GGUF file, hub id), in eval mode; the
    tokenizer is None when not asked for (`with_tokenizer=False`).

    The class is `auto_class` when given (a transformers class name: "AutoModel" for an encoder's hidden
    states, "AutoModelForCausalLM" …), else the checkpoint's `architectures[0]` (BertModel,
    LlamaForCausalLM …), so a causal LM keeps its LM head. GGUF files are dequantised once into posthoc's
    cache by `open_checkpoint`; `directory` is the Hugging Face directory the model was read from.
    """
    import transformers
    from transformers.utils import logging as hf_logging

    with open_checkpoint(spec) as ckpt:
        directory, archs = ckpt.directory, ckpt.config.get("architectures") or []
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{spec}: no config.json; expected a Hugging Face model directory")
    if auto_class is not None:
        cls = getattr(transformers, auto_class)
    else:
        cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), transformers.AutoModel)
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per load drowns the useful ones
    try:
        model = cls.from_pretrained(directory, dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory) if with_tokenizer else None
    except (OSError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{spec}: transformers cannot load it ({first})") from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer, directory
