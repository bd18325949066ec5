"""Load what posthoc wrote, ready to run: `posthoc.load(OUT_DIR, top_k=K)`.

An MoE-fication output (`posthoc split moe`) is a dense checkpoint whose FFN neurons are in expert
order, plus routers and the partition. `load` builds the dense model with transformers, checks that the
weights are the ones the routers were made for (the module's fingerprint), and replaces every FFN by an
MoE layer that computes only the experts each token is routed to.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from posthoc.analyse.moe.moefier import MoEError, MoEfier
from posthoc.checkpoint import open_checkpoint
from posthoc.models import load_model
from posthoc.modules.format import fingerprint
from posthoc.modules.masks import is_mask_module, load_masked


def load(
    path: str | os.PathLike[str],
    *,
    top_k: int | None = None,
    router: str | None = None,
    dtype: Any = None,
    return_tokenizer: bool = False,
    mode: str = "keep",
    base: str | os.PathLike[str] | None = None,
    healed: bool = True,
) -> Any:
    """The model in `path` with MoE layers (a torch module in eval mode; with its tokenizer if asked).

    top_k: experts per token in every layer (default: what was fitted, per-layer budgets and threshold
    routing included); router: "mlp", "centroid", "gate" (GLU FFNs: the FFN's own gate activations; whichever
    were fitted) or "oracle" (every neuron is computed to pick the true top-k: for evaluation only).
    healed: load what healing trained (default); a healed output loaded at another top_k than it was healed
    at warns (healing fits the layers to their own k). With top_k equal to the number of experts and nothing
    healed (an output fitted without healing or LoRA, or `healed=False`) the model computes the dense
    function (to float round-off).

    A mask module (`posthoc split cluster` / `split mask`) loads its base with the mask applied: mode "keep"
    (only what it marks) or "remove" (the model without it); base: the model it masks (default: its manifest's).
    """
    path = Path(path)
    if is_mask_module(path):
        return load_masked(path, mode=mode, base=base, dtype=dtype, return_tokenizer=return_tokenizer)
    moe = MoEfier.load(path)  # checks kind, format and version before the weights are touched
    with open_checkpoint(path) as ckpt:
        actual = fingerprint(ckpt)
    if actual != moe.manifest_.base.fingerprint:
        raise MoEError(
            f"{path}: the weights ({actual}) are not the ones the routers were made for "
            f"({moe.manifest_.base.fingerprint}); the checkpoint was modified after `posthoc split moe`"
        )
    model, tokenizer, _ = load_model(path, dtype=dtype or torch.float32)
    moe.apply(model, permuted=True, router=router, top_k=top_k, healed=healed)
    model.eval()
    return (model, tokenizer) if return_tokenizer else model
