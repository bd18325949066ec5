"""Write a module entry by entry: dense, sparse or LoRA changes, then the manifest (and the PEFT adapter).

Extraction, module merges and `stack --as-module` all produce modules through `ModuleBuilder`, so every
module on disk has the same layout whatever made it:

    module.json                the manifest (format.py)
    module.safetensors         dense changes and sparse (indices, values) pairs, under the base's names
    adapter_config.json        lora modules only: a PEFT LoRA config (α = r, so PEFT's scaling is 1)
    adapter_model.safetensors  lora modules only: the factors under PEFT's names, plus what PEFT needs to
                               reproduce the dense changes: new values of the biases of LoRA layers
                               (`bias: lora_only`) and of every other changed module (`modules_to_save`)
    fidelity.json, report.html how close the module is to what it was made from (when measured)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from posthoc.checkpoint import DEFAULT_SHARD_SIZE, Checkpoint
from posthoc.modules.format import MODULE_FILE, BaseRef, Manifest, ModuleError
from posthoc.modules.module import MODULE_STEM
from posthoc.modules.peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_STEM,
    PREFIX,
    BaseLayout,
    adapter_config,
    from_peft,
    peft_factor_names,
    to_peft,
)
from posthoc.modules.writer import ModuleWriter


def sparse_indices_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


class ModuleBuilder:
    """Streams the entries of one module into a directory; `finish` writes the manifest, `commit` publishes."""

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        kind: str,
        base_ref: BaseRef,
        *,
        force: bool = False,
        protect: Iterable[Path] = (),
        shard_size: int = DEFAULT_SHARD_SIZE,
        dtype: torch.dtype = torch.float32,
    ):
        self.kind = kind
        self.base_ref = base_ref
        self.dtype = dtype
        self.entries: dict[str, dict[str, Any]] = {}
        self.warnings: list[str] = []
        self.writer = ModuleWriter(out_dir, force=force, protect=protect, shard_size=shard_size, sharded=(MODULE_STEM,))

    @property
    def staging(self) -> Path:
        return self.writer.staging

    @property
    def out_dir(self) -> Path:
        return self.writer.out_dir

    def dense(self, name: str, phi: torch.Tensor) -> None:
        self.writer.write(MODULE_STEM, name, phi.to(self.dtype))
        self.entries[name] = {"storage": "dense", "shape": list(phi.shape), "file": MODULE_STEM, "key": name}

    def sparse(self, name: str, shape: tuple[int, ...], indices: torch.Tensor, values: torch.Tensor) -> None:
        """Entries at flat `indices` (ascending) of a tensor of `shape`."""
        numel = 1
        for s in shape:
            numel *= s
        self.writer.write(MODULE_STEM, f"{name}.indices", indices.to(sparse_indices_dtype(numel)))
        self.writer.write(MODULE_STEM, f"{name}.values", values.to(self.dtype))
        self.entries[name] = {
            "storage": "sparse", "shape": list(shape), "file": MODULE_STEM,
            "indices": f"{name}.indices", "values": f"{name}.values", "nnz": int(indices.numel()),
        }

    def lora(self, name: str, B: torch.Tensor, A: torch.Tensor, layout: str) -> None:
        """φ = B A (B (m, r), A (r, n)) for base tensor `name` = `<module>.weight`."""
        if not name.endswith(".weight"):
            raise ModuleError(f"tensor {name!r}: LoRA factors belong to a layer's weight")
        module = name[: -len(".weight")]
        key_a, key_b = peft_factor_names(module, layout)
        lora_a, lora_b = to_peft(B.to(torch.float32), A.to(torch.float32), layout)
        self.writer.write(ADAPTER_STEM, key_a, lora_a)
        self.writer.write(ADAPTER_STEM, key_b, lora_b)
        self.entries[name] = {
            "storage": "lora", "shape": [B.shape[0], A.shape[1]], "file": ADAPTER_STEM, "A": key_a, "B": key_b,
            "rank": int(B.shape[1]), "scale": 1.0, "layout": layout,
        }

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self.entries[name]
        return from_peft(self.writer.read(ADAPTER_STEM, entry["A"]), self.writer.read(ADAPTER_STEM, entry["B"]), entry["layout"], 1.0)

    # ------------------------------------------------------------------------------------------- finish

    def finish(
        self,
        *,
        base: Checkpoint | None,
        layout: BaseLayout | None,
        tags: dict[str, str] | None = None,
        provenance: dict[str, Any] | None = None,
        extra_json: dict[str, Any] | None = None,
    ) -> Manifest:
        """Write the PEFT adapter (lora modules), the manifest and the extra JSON files into staging."""
        if self.kind == "lora":
            self._finish_peft(base, layout)
        manifest = Manifest(
            kind=self.kind, base=self.base_ref, tensors=self.entries, tags=dict(tags or {}), provenance=dict(provenance or {})
        )
        self.writer.add_json(MODULE_FILE, manifest.to_json())
        for file_name, obj in (extra_json or {}).items():
            self.writer.add_json(file_name, obj)
        return manifest

    def commit(self) -> Path:
        return self.writer.commit()

    def _finish_peft(self, base: Checkpoint | None, layout: BaseLayout | None) -> None:
        """PEFT's view of the module: factors are in place; add the new values PEFT needs and the config."""
        targets = {n[: -len(".weight")]: e for n, e in self.entries.items() if e["storage"] == "lora"}
        dense = {n for n, e in self.entries.items() if e["storage"] == "dense"}
        if not targets and not dense:
            raise ModuleError("the module changes no tensor; there is nothing to write")
        if dense and (base is None or layout is None):
            raise ModuleError(
                f"writing tensor {sorted(dense)[0]!r} into the PEFT adapter needs the base model (PEFT stores new "
                "values of changed norms and biases, not changes); give the base"
            )
        ranks = {module: entry["rank"] for module, entry in targets.items()}

        def new_value(tensor: str) -> torch.Tensor:
            value = base.read(tensor)
            if tensor in dense:
                value = (value.to(torch.float32) + self.writer.read(MODULE_STEM, tensor).to(torch.float32)).to(value.dtype)
            return value

        # An input embedding tied to an output layer: the same change on both, as the stacked checkpoint has it.
        tied = layout.tied if layout is not None else {}
        for module, entry in targets.items():
            if module in tied and tied[module] not in targets:
                B, A = self.factors(f"{module}.weight")
                key_a, key_b = peft_factor_names(tied[module], "linear")
                lora_a, lora_b = to_peft(B, A, "linear")
                self.writer.write(ADAPTER_STEM, key_a, lora_a)
                self.writer.write(ADAPTER_STEM, key_b, lora_b)
                ranks[tied[module]] = entry["rank"]
        with_biases = False
        for module in targets:
            bias = f"{module}.bias"
            if base is not None and bias in base.tensors:
                self.writer.write(ADAPTER_STEM, f"{PREFIX}{module}.base_layer.bias", new_value(bias))
                with_biases = True
        saved: set[str] = set()
        for tensor in sorted(dense):
            owner = layout.owner.get(tensor)
            if tensor.endswith(".bias") and tensor[: -len(".bias")] in targets:
                continue
            if owner is None or owner == "" or owner in targets:
                self.warnings.append(
                    f"tensor {tensor}: PEFT has no place for this change (it is not a layer's weight or bias); "
                    "posthoc applies it, PeftModel.from_pretrained will not"
                )
                continue
            saved.add(owner)
        for module in sorted(saved):
            members = layout.members.get(module, [])
            clash = [t for t in members if self.entries.get(t, {}).get("storage") == "lora"]
            if clash:
                self.warnings.append(f"module {module}: holds LoRA target {clash[0]}; PEFT cannot also save it whole")
                continue
            for tensor in members:
                self.writer.write(ADAPTER_STEM, f"{PREFIX}{tensor}", new_value(tensor))
            if module in tied and f"{module}.weight" in members:
                self.writer.write(ADAPTER_STEM, f"{PREFIX}{tied[module]}.weight", new_value(f"{module}.weight"))
                saved.add(tied[module])
        if not ranks and saved:
            raise ModuleError(
                "every change is stored whole (no matrix was worth factoring); write a delta module instead "
                "(--kind delta), or lower --rank"
            )
        source = base.source if base is not None else self.base_ref.source
        self.writer.add_json(ADAPTER_CONFIG, adapter_config(source, ranks, sorted(saved), with_biases))
