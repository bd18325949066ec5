"""Open a module (ours, or a PEFT adapter made elsewhere) and read the change φ it makes to each base tensor.

    with open_module("modules/task-a") as module:
        module.kind                          # delta | sparse | lora
        module.names                         # base tensors it changes
        phi = module.delta(name, base)       # float32, the base tensor's shape (rows: a block of rows only)
        B, A = module.lora_factors(name)     # φ = B @ A exactly (PEFT's scaling folded into B)

Nothing is read until asked for: a module is opened lazily through the checkpoint I/O layer, and every
entry of the manifest is checked against the stored tensors' headers when it is opened, so a malformed
module fails at once with the tensor named, never half-way through a merge.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from posthoc.checkpoint import Checkpoint
from posthoc.errors import CheckpointError
from posthoc.modules.format import (
    CHANGE_KINDS,
    MISMATCH_REMEDY,
    MODULE_FILE,
    Manifest,
    ModuleError,
    check_base,
    read_manifest,
)
from posthoc.modules.peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_STEM,
    adapter_weight_files,
    from_peft,
    read_adapter_config,
    synthesize_manifest,
)

MODULE_STEM = "module"


def _stem_files(path: Path, stem: str) -> list[Path]:
    index = path / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ModuleError(f"{index}: not a valid index ({error})") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise ModuleError(f"{index}: lists {missing[0].name}, which is missing")
        return files
    if (path / f"{stem}.safetensors").is_file():
        return [path / f"{stem}.safetensors"]
    if stem == ADAPTER_STEM and (path / ADAPTER_CONFIG).is_file():
        return adapter_weight_files(path)
    return []


class Module:
    """An opened module: its manifest and lazy access to the change of every base tensor it touches."""

    def __init__(self, path: Path, manifest: Manifest, source: str | None = None):
        self.path = path
        self.source = source or str(path)
        self.manifest = manifest
        if manifest.kind not in CHANGE_KINDS:
            raise ModuleError(
                f"{path}: a module of kind {manifest.kind!r} holds no weight change; only {', '.join(CHANGE_KINDS)} "
                "modules can be stacked, merged or extracted"
            )
        self._files: dict[str, Checkpoint] = {}
        try:
            for stem in {e.get("file") or MODULE_STEM for e in manifest.tensors.values()}:
                files = _stem_files(path, stem)
                if not files:
                    raise ModuleError(f"{path}: the manifest refers to {stem}.safetensors, which is missing")
                try:
                    self._files[stem] = Checkpoint(path, files, self.source)
                except CheckpointError as error:
                    raise ModuleError(str(error)) from None
            for name in manifest.tensors:
                self._check_entry(name)
        except BaseException:
            self.close()
            raise
        self._sparse_cache: tuple[str, torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------------------------------ manifest

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def names(self) -> list[str]:
        return list(self.manifest.tensors)

    def entry(self, name: str) -> dict[str, Any]:
        return self.manifest.tensors[name]

    def storage(self, name: str) -> str:
        return self.manifest.tensors[name]["storage"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.manifest.tensors[name]["shape"])

    def rank(self, name: str) -> int | None:
        entry = self.manifest.tensors[name]
        return entry["rank"] if entry["storage"] == "lora" else None

    def _file(self, name: str) -> Checkpoint:
        return self._files[self.manifest.tensors[name].get("file") or MODULE_STEM]

    def _stored(self, name: str, key: str) -> tuple[int, ...]:
        info = self._file(name).tensors.get(key)
        if info is None:
            raise ModuleError(f"{self.path}: the manifest's entry for {name!r} names tensor {key!r}, which is not stored")
        return info.shape

    def _check_entry(self, name: str) -> None:
        """Stored tensors agree with the manifest's shapes (headers only)."""
        entry = self.manifest.tensors[name]
        shape = tuple(entry["shape"])
        storage = entry["storage"]
        where = f"{self.path}: tensor {name!r}"
        if storage in ("dense", "absolute"):
            stored = self._stored(name, entry["key"])
            if stored != shape:
                raise ModuleError(f"{where}: stored {list(stored)}, but the manifest says {list(shape)}")
        elif storage == "sparse":
            idx, val = self._stored(name, entry["indices"]), self._stored(name, entry["values"])
            if len(idx) != 1 or idx != val or ("nnz" in entry and idx[0] != entry["nnz"]):
                raise ModuleError(f"{where}: indices {list(idx)} and values {list(val)} must be two vectors of nnz entries")
        else:
            a, b = self._stored(name, entry["A"]), self._stored(name, entry["B"])
            r = entry["rank"]
            m, n = shape
            expected = ((r, n), (m, r)) if entry.get("layout", "linear") == "linear" else ((r, m), (n, r))
            if (a, b) != expected:
                raise ModuleError(
                    f"{where}: LoRA factors A {list(a)} and B {list(b)} do not make a rank-{r} change of shape "
                    f"{list(shape)} (expected A {list(expected[0])}, B {list(expected[1])})"
                )

    def check_base(
        self, base: Checkpoint, *, fingerprint: str | None = None, allow_mismatch: bool = False, remedy: str = MISMATCH_REMEDY
    ) -> list[str]:
        """The module belongs to `base` (fingerprint, then every tensor it changes exists with its shape).

        A missing tensor or a shape mismatch is refused even with `allow_mismatch`: it cannot be applied."""
        warnings = check_base(self.manifest, base, str(self.path), allow_mismatch=allow_mismatch, actual=fingerprint,
                              remedy=remedy)
        for name, entry in self.manifest.tensors.items():
            info = base.tensors.get(name)
            if info is None:
                raise ModuleError(
                    f"{self.path}: changes tensor {name!r}, which the base {base.source} does not have; "
                    "was it made for another architecture?"
                )
            if tuple(info.shape) != tuple(entry["shape"]):
                raise ModuleError(
                    f"{self.path}: tensor {name!r} has shape {entry['shape']} in the module but "
                    f"{list(info.shape)} in the base {base.source}"
                )
            if not info.dtype.is_floating_point:
                raise ModuleError(f"{self.path}: changes {name!r}, an integer tensor of the base; only float weights change")
        return warnings

    # -------------------------------------------------------------------------------------------- values

    def lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) in float32 with φ = B @ A exactly: B (m, r), A (r, n); any scaling is folded into B."""
        entry = self.manifest.tensors[name]
        if entry["storage"] != "lora":
            raise ModuleError(f"{self.path}: tensor {name!r} is stored {entry['storage']}, not as LoRA factors")
        file = self._file(name)
        return from_peft(file.read(entry["A"]), file.read(entry["B"]), entry.get("layout", "linear"), float(entry.get("scale", 1.0)))

    def sparse(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat positions int64 ascending, values float32) of a sparse entry."""
        if self._sparse_cache is not None and self._sparse_cache[0] == name:
            return self._sparse_cache[1], self._sparse_cache[2]
        entry = self.manifest.tensors[name]
        file = self._file(name)
        indices = file.read(entry["indices"])
        values = file.read(entry["values"]).to(torch.float32)
        if indices.dtype not in (torch.int32, torch.int64):
            raise ModuleError(f"{self.path}: tensor {name!r}: indices must be int32 or int64, got {indices.dtype}")
        indices = indices.to(torch.int64)
        numel = 1
        for s in entry["shape"]:
            numel *= s
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
            raise ModuleError(f"{self.path}: tensor {name!r}: a sparse index lies outside its {numel} entries")
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise ModuleError(f"{self.path}: tensor {name!r}: sparse indices must be strictly ascending")
        self._sparse_cache = (name, indices, values)
        return indices, values

    def delta(self, name: str, base: Checkpoint | None = None, rows: slice | None = None) -> torch.Tensor:
        """φ of one base tensor (or of a block of its rows), float32, in the base tensor's shape."""
        entry = self.manifest.tensors[name]
        shape = list(entry["shape"])
        storage = entry["storage"]
        if rows is not None and shape:
            start, stop, _ = rows.indices(shape[0])
            rows = slice(start, stop)
        if storage == "dense":
            return self._file(name).read(entry["key"], rows).to(torch.float32)
        if storage == "lora":
            B, A = self.lora_factors(name)
            return (B if rows is None else B[rows]) @ A
        if storage == "absolute":
            if base is None:
                raise ModuleError(
                    f"{self.path}: tensor {name!r} holds a new value (a PEFT saved module or bias), not a change; "
                    "the base is needed to turn it into one (give --base)"
                )
            value = self._file(name).read(entry["key"], rows).to(torch.float32)
            return value - base.read(name, rows).to(torch.float32)
        indices, values = self.sparse(name)
        if rows is None:
            out = torch.zeros(shape, dtype=torch.float32)
            out.view(-1)[indices] = values
            return out
        row = 1
        for s in shape[1:]:
            row *= s
        low, high = rows.start * row, rows.stop * row
        begin, end = (int(i) for i in torch.searchsorted(indices, torch.tensor([low, high])))
        out = torch.zeros([rows.stop - rows.start, *shape[1:]], dtype=torch.float32)
        out.view(-1)[indices[begin:end] - low] = values[begin:end]
        return out

    def close(self) -> None:
        for file in self._files.values():
            file.close()

    def __enter__(self) -> Module:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Module({self.source!r}, {self.kind}, {len(self.manifest.tensors)} tensors)"


def open_module(path: str | os.PathLike[str]) -> Module:
    """A module directory (module.json), or a PEFT LoRA adapter directory made elsewhere (adapter_config.json)."""
    source = str(path)
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModuleError(f"{source}: no such module directory")
    if (path / MODULE_FILE).is_file():
        manifest = read_manifest(path)
        if manifest.kind == "lora" and (path / ADAPTER_CONFIG).is_file():
            read_adapter_config(path)  # still a plain LoRA (a hand-edited config could have turned DoRA on)
        return Module(path, manifest, source)
    if (path / ADAPTER_CONFIG).is_file():
        return Module(path, synthesize_manifest(path), source)
    raise ModuleError(f"{source}: no {MODULE_FILE} (nor a PEFT {ADAPTER_CONFIG}): not a module")
