"""A streaming, atomic writer for module directories, whose tensors are not known in advance.

`posthoc.checkpoint.CheckpointWriter` lays shards out before the data arrives, which needs every output
shape up front. A module's shapes are only known as it is computed: how many entries a sparse tensor keeps
is decided by a threshold over the whole model, a LoRA's rank by the spectrum of each matrix. So this
writer appends each tensor's bytes to a data file as it comes (nothing is buffered in memory), remembers
where it went, and at `commit()` writes each safetensors file as header + the appended bytes (one copy on
disk, of the module only), then renames the staging directory into place. Files can be read back while
being written (`read`), which finishing a PEFT adapter needs.

Everything goes to a temporary directory next to the target; an exception leaves the target untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from posthoc.checkpoint import DEFAULT_SHARD_SIZE, DTYPE_NAMES, check_output_location, replace_directory
from posthoc.errors import OutputError


class _AppendedFile:
    """One logical safetensors output (`<stem>.safetensors`, or shards + index when `shardable`)."""

    def __init__(self, staging: Path, stem: str, shard_size: int, shardable: bool):
        self.staging, self.stem = staging, stem
        self.shard_size, self.shardable = shard_size, shardable
        self.shards: list[dict[str, Any]] = []  # {"data": Path, "fd": int, "size": int, "entries": {name: (dtype, shape, begin, end)}}
        self.where: dict[str, int] = {}  # tensor name -> shard number

    def _shard(self, nbytes: int) -> dict[str, Any]:
        current = self.shards[-1] if self.shards else None
        if current is None or (self.shardable and current["entries"] and current["size"] + nbytes > self.shard_size):
            path = self.staging / f".{self.stem}-{len(self.shards)}.data"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            current = {"data": path, "fd": fd, "size": 0, "entries": {}}
            self.shards.append(current)
        return current

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.where:
            raise OutputError(f"tensor {name!r} was written twice to {self.stem}")
        if tensor.dtype not in DTYPE_NAMES:
            raise OutputError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored in safetensors")
        raw = memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        shard = self._shard(len(raw))
        begin = shard["size"]
        done = 0
        while done < len(raw):
            done += os.pwrite(shard["fd"], raw[done:], begin + done)
        shard["size"] += len(raw)
        shard["entries"][name] = (tensor.dtype, tuple(tensor.shape), begin, begin + len(raw))
        self.where[name] = len(self.shards) - 1

    def read(self, name: str) -> torch.Tensor:
        shard = self.shards[self.where[name]]
        dtype, shape, begin, end = shard["entries"][name]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        got = 0
        while got < len(view):
            got += os.preadv(shard["fd"], [view[got:]], begin + got)
        return buffer.view(dtype).reshape(shape)

    def finish(self) -> tuple[int, int]:
        """Write the final file(s); returns (total bytes, number of shards)."""
        count = len(self.shards)
        weight_map: dict[str, str] = {}
        total = 0
        for i, shard in enumerate(self.shards):
            file_name = f"{self.stem}.safetensors" if count == 1 else f"{self.stem}-{i + 1:05d}-of-{count:05d}.safetensors"
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            for name, (dtype, shape, begin, end) in shard["entries"].items():
                header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
                weight_map[name] = file_name
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            with open(self.staging / file_name, "wb") as out:
                out.write(struct.pack("<Q", len(raw)) + raw)
                os.lseek(shard["fd"], 0, os.SEEK_SET)
                with os.fdopen(os.dup(shard["fd"]), "rb") as data:
                    shutil.copyfileobj(data, out, 16 << 20)
            total += shard["size"]
            self.close_data(shard)
        if count > 1:
            (self.staging / f"{self.stem}.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
            )
        return total, count

    @staticmethod
    def close_data(shard: dict[str, Any]) -> None:
        if shard.get("fd") is not None:
            os.close(shard["fd"])
            shard["fd"] = None
        Path(shard["data"]).unlink(missing_ok=True)

    def abort(self) -> None:
        for shard in self.shards:
            self.close_data(shard)


class ModuleWriter:
    """Atomic, streaming writer of a module directory: tensors appended to one or more safetensors files.

    Usage::

        with ModuleWriter(out, protect=inputs) as w:
            w.write("module", name, tensor)             # appended, any shape, any order
            w.write("adapter_model", key, factor)
            w.add_json("module.json", manifest)
            w.commit()                                  # without it nothing appears

    `sharded` stems are split into shards of `shard_size` bytes with a Hugging Face index; others (a PEFT
    adapter, which PEFT reads as one file) are always a single file.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        force: bool = False,
        protect: Iterable[Path] = (),
        shard_size: int = DEFAULT_SHARD_SIZE,
        sharded: Iterable[str] = ("module",),
    ):
        if shard_size <= 0:
            raise OutputError(f"shard size must be positive, got {shard_size}")
        self.out_dir = check_output_location(Path(out_dir), protect, force)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.staging = self.out_dir.parent / f".{self.out_dir.name}.posthoc-tmp-{uuid.uuid4().hex[:8]}"
        self.staging.mkdir()
        self.shard_size = shard_size
        self.sharded = set(sharded)
        self._files: dict[str, _AppendedFile] = {}
        self._committed = False
        self._finalized = False
        self.total_size = 0
        self.num_shards = 0

    def write(self, stem: str, name: str, tensor: torch.Tensor) -> None:
        if self._finalized:
            raise OutputError(f"tensor {name!r}: the module was already finalized")
        if stem not in self._files:
            self._files[stem] = _AppendedFile(self.staging, stem, self.shard_size, stem in self.sharded)
        self._files[stem].write(name, tensor)

    def has(self, stem: str, name: str) -> bool:
        return stem in self._files and name in self._files[stem].where

    def read(self, stem: str, name: str) -> torch.Tensor:
        """A tensor written earlier (read back from the staging data)."""
        return self._files[stem].read(name)

    def names(self, stem: str) -> list[str]:
        return list(self._files[stem].where) if stem in self._files else []

    def add_json(self, file_name: str, obj: Any) -> None:
        (self.staging / file_name).write_text(json.dumps(obj, indent=2) + "\n")

    def finalize(self) -> Path:
        """Write the final safetensors files into the staging directory (a complete module that can be opened
        and checked there); `commit` then publishes it. No tensor can be added afterwards."""
        if not self._finalized:
            for appended in self._files.values():
                size, shards = appended.finish()
                self.total_size += size
                self.num_shards += shards
            self._finalized = True
        return self.staging

    def commit(self) -> Path:
        self.finalize()
        replace_directory(self.staging, self.out_dir)
        self._committed = True
        return self.out_dir

    def abort(self) -> None:
        for appended in self._files.values():
            appended.abort()
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> ModuleWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            self.abort()
