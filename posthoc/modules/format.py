"""The module format: a directory of safetensors plus a small manifest, `module.json`.

A module is the survey's unit of computation made portable: the change a fine-tune (or an analysis) makes
to a base model, saved apart from the base so that it can be stacked, swapped and merged.

    module.json             {"format": "posthoc-module", "format_version": 1, "kind": ..., "base": {...},
                             "tensors": {name: {...}}, "tags": {...}, "provenance": {...}, "posthoc_version": ...}
    module.safetensors      the tensors (sharded with an index like a checkpoint when large)

kind        what the tensors mean
  delta       dense task vector θ_tuned − θ_base, one tensor per changed base tensor
  sparse      the same, stored as `<name>.indices` (int32/int64 flat positions, ascending) + `<name>.values`
  lora        low-rank factors; the directory is at the same time a PEFT adapter
              (adapter_config.json + adapter_model.safetensors)
  experts     a partition of FFN neurons into experts plus routers (MoE-fication)
  mask        binary masks over base weights or neurons (subnetworks, clusters)

For the kinds that hold a change φ of the base (delta, sparse, lora), every entry of `tensors` says how
the change of one base tensor is stored (`shape` is the base tensor's shape, checked against the base):

  {"storage": "dense",    "shape": [m, n], "file": "module", "key": NAME}             φ = the tensor
  {"storage": "sparse",   "shape": [m, n], "file": "module", "indices": I, "values": V, "nnz": k}
  {"storage": "lora",     "shape": [m, n], "file": "adapter_model", "A": KA, "B": KB, "rank": r,
                          "scale": s, "layout": "linear" | "embedding"}
        linear:    φ = s · B A        (PEFT lora_B (m, r), lora_A (r, n))
        embedding: φ = s · (B A)ᵀ     (PEFT lora_embedding_B (n, r), lora_embedding_A (r, m))
  {"storage": "absolute", "shape": [m, n], "file": "adapter_model", "key": K}         φ = tensor − base
        (a PEFT adapter's saved modules and biases hold new values, not changes)

A PEFT adapter made elsewhere has no module.json; `posthoc.modules.peft_format` synthesises one with an empty
base fingerprint (its base is then checked by tensor names and shapes only).

`base` names the base the module belongs to: its architecture and a fingerprint of its weights that is
cheap to compute (names, shapes, dtypes and the first row of every tensor) and so cheap to check before a
module is applied to another model.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posthoc.checkpoint import Checkpoint, open_checkpoint, save_state_dict
from posthoc.errors import PosthocError
from posthoc.provenance import __version__

MODULE_FILE = "module.json"
FORMAT = "posthoc-module"
FORMAT_VERSION = 1
KINDS = ("delta", "sparse", "lora", "experts", "mask")


class ModuleError(PosthocError):
    """A module is missing, malformed, or does not belong to the base it is applied to."""


def fingerprint(ckpt: Checkpoint) -> str:
    """A cheap identity of a checkpoint's weights: every name, shape and dtype, and the bytes of the first
    row of every tensor (one small read each, whatever the model size)."""
    digest = hashlib.sha256()
    for name in sorted(ckpt.tensors):
        info = ckpt.tensors[name]
        digest.update(f"{name}|{list(info.shape)}|{info.dtype}\n".encode())
        first = ckpt.read(name, slice(0, 1)) if info.shape and info.shape[0] > 0 else ckpt.read(name)
        digest.update(first.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:32]


@dataclass
class BaseRef:
    """The base model a module belongs to."""

    architecture: str | None
    fingerprint: str
    source: str = ""
    model_type: str | None = None

    @classmethod
    def of(cls, ckpt: Checkpoint) -> BaseRef:
        return cls(ckpt.architecture, fingerprint(ckpt), ckpt.source, ckpt.config.get("model_type"))


@dataclass
class Manifest:
    kind: str
    base: BaseRef
    tensors: dict[str, dict[str, Any]]  # base tensor name -> how the module stores its change
    tags: dict[str, str] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    posthoc_version: str = __version__

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "base": {
                "architecture": self.base.architecture,
                "model_type": self.base.model_type,
                "fingerprint": self.base.fingerprint,
                "source": self.base.source,
            },
            "tensors": self.tensors,
            "tags": self.tags,
            "provenance": self.provenance,
            "posthoc_version": self.posthoc_version,
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> Manifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ModuleError(f"{where}: not a posthoc module manifest (field 'format' must be {FORMAT!r})")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ModuleError(
                f"{where}: field 'format_version' is {version!r}; this posthoc reads up to {FORMAT_VERSION} "
                "(upgrade posthoc)"
            )
        kind = data.get("kind")
        if kind not in KINDS:
            raise ModuleError(f"{where}: field 'kind' is {kind!r}; valid kinds: {', '.join(KINDS)}")
        base = data.get("base")
        if not isinstance(base, dict) or not isinstance(base.get("fingerprint"), str):
            raise ModuleError(f"{where}: field 'base.fingerprint' is missing")
        tensors = data.get("tensors")
        if not isinstance(tensors, dict):
            raise ModuleError(f"{where}: field 'tensors' must map base tensor names to entries")
        for key in ("tags", "provenance"):
            if not isinstance(data.get(key, {}), dict):
                raise ModuleError(f"{where}: field {key!r} must be a mapping")
        if kind in CHANGE_KINDS:
            for name, entry in tensors.items():
                check_entry(kind, name, entry, where)
        return cls(
            kind=kind,
            base=BaseRef(base.get("architecture"), base["fingerprint"], base.get("source", ""), base.get("model_type")),
            tensors=tensors,
            tags=dict(data.get("tags") or {}),
            provenance=dict(data.get("provenance") or {}),
            posthoc_version=str(data.get("posthoc_version", "")),
        )


CHANGE_KINDS = ("delta", "sparse", "lora")  # kinds whose tensors hold a change φ of the base
STORAGES = {"delta": ("dense",), "sparse": ("sparse",), "lora": ("lora", "dense", "absolute")}
_ENTRY_KEYS = {
    "dense": ("key",),
    "absolute": ("key",),
    "sparse": ("indices", "values"),
    "lora": ("A", "B"),
}
LAYOUTS = ("linear", "embedding")


def check_entry(kind: str, name: str, entry: Any, where: str) -> None:
    """One line naming the tensor and the field when an entry of a delta/sparse/lora manifest is malformed."""
    if not isinstance(entry, dict):
        raise ModuleError(f"{where}: entry for tensor {name!r} must be a mapping, got {entry!r}")
    storage = entry.get("storage")
    if storage not in STORAGES[kind]:
        raise ModuleError(
            f"{where}: tensor {name!r}: field 'storage' is {storage!r}; a {kind} module stores "
            f"{' or '.join(STORAGES[kind])}"
        )
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ModuleError(f"{where}: tensor {name!r}: field 'shape' must be a list of sizes, got {shape!r}")
    for key in _ENTRY_KEYS[storage]:
        if not isinstance(entry.get(key), str):
            raise ModuleError(f"{where}: tensor {name!r}: field {key!r} (a stored tensor name) is missing")
    if not isinstance(entry.get("file", ""), str):
        raise ModuleError(f"{where}: tensor {name!r}: field 'file' must be a file stem")
    if storage == "lora":
        rank, scale = entry.get("rank"), entry.get("scale", 1.0)
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ModuleError(f"{where}: tensor {name!r}: field 'rank' must be an int >= 1, got {rank!r}")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            raise ModuleError(f"{where}: tensor {name!r}: field 'scale' must be a number, got {scale!r}")
        if entry.get("layout", "linear") not in LAYOUTS:
            raise ModuleError(f"{where}: tensor {name!r}: field 'layout' must be one of {', '.join(LAYOUTS)}")
        if len(shape) != 2:
            raise ModuleError(f"{where}: tensor {name!r}: a LoRA entry needs a 2-D base tensor, shape is {shape}")


def is_module(path: str | os.PathLike[str]) -> bool:
    path = Path(path)
    return (path / MODULE_FILE).is_file() or (path / "adapter_config.json").is_file()


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """The manifest of a module directory (one line naming the file and field when it is malformed)."""
    file = Path(path) / MODULE_FILE
    if not file.is_file():
        raise ModuleError(f"{path}: no {MODULE_FILE}: not a posthoc module")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModuleError(f"{file}: not valid JSON ({error})") from None
    return Manifest.from_json(data, str(file))


def open_module_tensors(path: str | os.PathLike[str]) -> Checkpoint:
    """The tensors of a module, lazily, through the checkpoint I/O layer."""
    return open_checkpoint(path)


MISMATCH_REMEDY = "pass --allow-base-mismatch to apply it anyway"
MERGE_REMEDY = "merge it with the base it was made for (base_model / --base, or BASE+MODULE)"


def check_base(
    manifest: Manifest,
    base: Checkpoint,
    where: str,
    *,
    allow_mismatch: bool = False,
    actual: str | None = None,
    remedy: str = MISMATCH_REMEDY,
) -> list[str]:
    """Refuse a module made for another base (both fingerprints named); with `allow_mismatch`, warn instead.

    `actual` is the base's fingerprint when the caller has it already (it costs one small read per tensor);
    `remedy` ends the refusal (a command without --allow-base-mismatch says what to do instead)."""
    if not manifest.base.fingerprint:  # a PEFT adapter made elsewhere: names and shapes are checked instead
        return [f"{where}: no base fingerprint (a PEFT adapter made elsewhere); checked tensor names and shapes only"]
    actual = actual or fingerprint(base)
    if actual == manifest.base.fingerprint:
        return []
    message = (
        f"{where}: module was made for base {manifest.base.fingerprint} ({manifest.base.source or 'unknown source'}) "
        f"but {base.source} is {actual}"
    )
    if not allow_mismatch:
        raise ModuleError(f"{message}; {remedy}")
    return [message]


def write_module(
    out_dir: str | os.PathLike[str],
    manifest: Manifest,
    tensors: dict[str, torch.Tensor],
    *,
    force: bool = False,
    protect: Iterable[Path] = (),
    weights_name: str = "module",
    extra_json: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a module atomically (temporary directory, renamed at the end) through the checkpoint writer."""
    return save_state_dict(
        tensors, out_dir, force=force, protect=protect, weights_name=weights_name,
        extra_json={MODULE_FILE: manifest.to_json(), **(extra_json or {})}, extra_files=extra_files,
    )
