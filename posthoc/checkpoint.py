"""The one checkpoint I/O layer: open a checkpoint lazily, read one tensor at a time, write atomically.

Reading
    `open_checkpoint(spec)` accepts a local Hugging Face directory (single or sharded safetensors, or
    `.bin` files loaded with `torch.load(weights_only=True)`), a single `.safetensors` file, a GGUF file
    (dequantised once by transformers into a cached safetensors directory) or a hub id (downloaded
    through huggingface_hub when online). Listing names, shapes and dtypes reads headers only.
    `Checkpoint.read(name)` reads exactly one tensor with `pread` into memory of its own.
    `Checkpoint.read_mapped(name)` maps just that tensor copy-on-write (no copy; writes never reach the
    file) and unmaps it when the tensor is freed, so a streaming reader's resident memory is still the
    tensors it holds, not every page of every input it has touched (what one long-lived map of each file
    would cost). The safetensors library itself validates every file when it is opened.

Writing
    `CheckpointWriter` knows every output tensor's name, shape and dtype before any data arrives (the
    merge plan gives them), so it lays out the shards up front, writes each safetensors header first and
    streams each tensor's bytes to its final offset the moment it is computed: no output shard is ever
    buffered in memory. Everything goes to a temporary directory next to the target and is renamed into
    place by `commit()`; an exception, a kill or a failed check leaves the target untouched.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import shutil
import struct
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posthoc.errors import CheckpointError, OutputError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# Files that describe a model without being weights; copied from the chosen source into outputs.
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
)
DEFAULT_SHARD_SIZE = 5_000_000_000
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class TensorInfo:
    """What is known about a stored tensor without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)


def dtype_size(dtype: torch.dtype) -> int:
    return dtype.itemsize


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'bfloat16', 'bf16', 'float16', 'fp32', torch.float32 … -> torch dtype (None stays None)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    aliases = {
        "bf16": "bfloat16",
        "fp16": "float16",
        "half": "float16",
        "fp32": "float32",
        "float": "float32",
        "fp64": "float64",
        "double": "float64",
    }
    key = aliases.get(str(name).lower(), str(name).lower())
    dtype = getattr(torch, key, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(
            f"unknown dtype {name!r}: use one of float32, float16, bfloat16, float64"
        )
    return dtype


# --------------------------------------------------------------------------------------------- reading


class _SafetensorsFile:
    """One safetensors file: header parsed once, each tensor read with pread or mapped on its own."""

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        self.path = path
        try:  # the reference parser validates the header, the offsets and the file size
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path}: not a valid safetensors file ({error})") from None
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        self.data_start = 8 + header_len
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.infos: dict[str, TensorInfo] = {}
        self.offsets: dict[str, tuple[int, int]] = {}
        for name, entry in header.items():
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
            self.infos[name] = TensorInfo(name, tuple(entry["shape"]), dtype, path)
            self.offsets[name] = tuple(entry["data_offsets"])
        self._fd: int | None = None
        self._opening = threading.Lock()

    def _byte_range(self, name: str, rows: slice | None) -> tuple[int, int, list[int]]:
        """(first byte, end byte) of the tensor (or its block of rows) in the file's data, and its shape."""
        info = self.infos[name]
        begin, end = self.offsets[name]
        shape = list(info.shape)
        if rows is not None and shape:
            start, stop, _ = rows.indices(shape[0])
            row_bytes = (end - begin) // shape[0] if shape[0] else 0
            begin, end = begin + start * row_bytes, begin + stop * row_bytes
            shape[0] = stop - start
        return begin, end, shape

    def _file(self) -> int:
        if self._fd is None:
            with self._opening:  # tensors are read from several threads (the merge engine's workers)
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        info = self.infos[name]
        begin, end, shape = self._byte_range(name, rows)
        fd = self._file()
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        got = 0
        while got < len(view):
            n = os.preadv(fd, [view[got:]], self.data_start + begin + got)
            if n == 0:
                raise CheckpointError(f"{self.path}: tensor {name!r} is truncated (file ends early)")
            got += n
        return buffer.view(info.dtype).reshape(shape)

    def map(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The tensor (or a block of its rows) memory-mapped copy-on-write: no copy is made, the pages are the
        page cache's, and a write to the result never reaches the file. The mapping lasts as long as the
        tensor (so a process's resident memory stays what it uses)."""
        info = self.infos[name]
        begin, end, shape = self._byte_range(name, rows)
        first = self.data_start + begin
        if end == begin or first % info.dtype.itemsize:  # nothing to map, or not aligned for a typed view
            return self.read(name, rows)
        page_start = first - first % mmap.ALLOCATIONGRANULARITY
        fd = self._file()
        if self.data_start + end > os.fstat(fd).st_size:
            raise CheckpointError(f"{self.path}: tensor {name!r} is truncated (file ends early)")
        try:
            mapped = mmap.mmap(fd, self.data_start + end - page_start, access=mmap.ACCESS_COPY, offset=page_start)
        except OSError:  # a file system without memory maps
            return self.read(name, rows)
        raw = torch.frombuffer(mapped, dtype=torch.uint8, count=end - begin, offset=first - page_start)
        return raw.view(info.dtype).reshape(shape)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _PickleFile:
    """A PyTorch `.bin` file, loaded with weights_only=True (no code runs) and memory-mapped when possible."""

    def __init__(self, path: Path):
        self.path = path
        self._tensors: dict[str, torch.Tensor] | None = None
        state = self._load()
        self.infos = {
            name: TensorInfo(name, tuple(t.shape), t.dtype, path) for name, t in state.items()
        }
        self.metadata: dict[str, str] = {}

    def _load(self) -> dict[str, torch.Tensor]:
        if self._tensors is not None:
            return self._tensors
        import pickle

        try:
            try:
                state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:  # legacy (non-zip) files cannot be memory-mapped
                if "mmap" not in str(error):
                    raise
                state = torch.load(self.path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            first = str(error).strip().splitlines()[0]
            raise CheckpointError(
                f"{self.path}: refused to unpickle: it holds more than tensors and could run code "
                f"({first[:160]}). Convert it to safetensors with a tool you trust."
            ) from None
        except (RuntimeError, EOFError, OSError) as error:
            raise CheckpointError(f"{self.path}: not a readable PyTorch file ({error})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{self.path}: not a state dict of tensors")
        self._tensors = state
        return state

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        tensor = self._load()[name]
        return (tensor[rows] if rows is not None else tensor).clone()

    def close(self) -> None:
        self._tensors = None


class Checkpoint:
    """A model's weights on disk, read lazily. Use `open_checkpoint` to make one."""

    def __init__(self, directory: Path, weight_files: Sequence[Path], source: str):
        self.directory = directory
        self.source = source
        self._files: dict[Path, _SafetensorsFile | _PickleFile] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for file in weight_files:
            reader = _SafetensorsFile(file) if file.suffix == ".safetensors" else _PickleFile(file)
            self._files[file] = reader
            for name, info in reader.infos.items():
                if name in self.tensors:
                    raise CheckpointError(f"{file}: tensor {name!r} is also in {self.tensors[name].file}")
                self.tensors[name] = info
        self.config: dict[str, Any] = _read_json(directory / "config.json") or {}

    def __repr__(self) -> str:
        return f"Checkpoint({self.source!r}, {len(self.tensors)} tensors)"

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    @property
    def architecture(self) -> str | None:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else self.config.get("model_type")

    @property
    def num_parameters(self) -> int:
        return sum(info.numel for info in self.tensors.values())

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Read one tensor (optionally a block of its rows) into memory of its own."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.source}: no tensor named {name!r}")
        return self._files[info.file].read(name, rows)

    def read_mapped(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Like `read`, but memory-mapped (copy-on-write, see `_SafetensorsFile.map`) where the tensor is stored
        in safetensors: for a reader that streams through many tensors, no copy and no fresh memory to fault
        in. Anything else is read into memory of its own."""
        info = self.tensors.get(name)
        reader = self._files.get(info.file) if info is not None else None
        if isinstance(reader, _SafetensorsFile):
            return reader.map(name, rows)
        return self.read(name, rows)

    def close(self) -> None:
        for reader in self._files.values():
            reader.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CheckpointView(Checkpoint):
    """A checkpoint computed from another one as it is read (a base with modules added, a masked base): the
    base's names, shapes, dtypes, config and directory; a subclass defines `read`."""

    def __init__(self, base: Checkpoint, source: str, warnings: list[str]):
        self.base = base
        self.source = source
        self.warnings = warnings
        self.directory = base.directory
        self.config = base.config
        self.tensors = base.tensors
        self._files = {}

    def close(self) -> None:
        self.base.close()


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None


def _weight_files(directory: Path) -> list[Path]:
    """The weight files of a Hugging Face directory, safetensors first, the way transformers picks them."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = _read_json(directory / index_name)
        if index is not None:
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{directory / index_name}: has no 'weight_map'")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (directory / f).is_file()]
            if missing:
                raise CheckpointError(f"{directory / index_name}: lists {missing[0]}, which is missing")
            return [directory / f for f in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (directory / single).is_file():
            return [directory / single]
    loose = sorted(directory.glob("*.safetensors"))
    if loose:
        return loose
    return []


def open_checkpoint(spec: str | os.PathLike[str], *, revision: str | None = None) -> Checkpoint:
    """Open a checkpoint from a local directory or file, a GGUF file, or a hub id (online only)."""
    source = str(spec)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return _renamed(open_checkpoint(gguf_to_safetensors(path)), source)
        if path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
            return Checkpoint(path.parent, [path], source)
        raise CheckpointError(f"{path}: not a checkpoint file (expected .safetensors, .bin or .gguf)")
    if path.is_dir():
        files = _weight_files(path)
        if not files:
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return _renamed(open_checkpoint(ggufs[0]), source)
            raise CheckpointError(
                f"{path}: no weights found (expected model.safetensors, a sharded index, pytorch_model.bin "
                "or one .gguf file)"
            )
        return Checkpoint(path, files, source)
    repo_id, _, at_revision = source.partition("@")  # mergekit's `org/name@revision`
    if HUB_ID.match(repo_id) and not source.startswith(("./", "../")) and "/" in repo_id:
        local = download_from_hub(repo_id, revision=revision or at_revision or None)
        return _renamed(open_checkpoint(local), source)
    raise CheckpointError(f"{source}: no such file or directory (and not a hub id of the form org/name)")


def _renamed(ckpt: Checkpoint, source: str) -> Checkpoint:
    ckpt.source = source  # messages name what the user typed, not a cache path
    return ckpt


def download_from_hub(repo_id: str, *, revision: str | None = None) -> Path:
    """Fetch a model's weights, config and tokenizer files from the hub; one clear line when offline."""
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    offline_errors: tuple[type[BaseException], ...] = (
        hub_errors.LocalEntryNotFoundError,
        hub_errors.OfflineModeIsEnabled,
        ConnectionError,
        TimeoutError,
    )
    try:
        import httpx

        offline_errors += (httpx.TransportError,)
    except ImportError:  # older huggingface_hub uses requests, whose errors are ConnectionErrors
        pass
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        local = Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        if not _weight_files(local):  # an older repository with pickled weights only
            local = Path(
                huggingface_hub.snapshot_download(
                    repo_id, revision=revision, allow_patterns=[*patterns, "*.bin"]
                )
            )
    except (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError) as error:
        raise CheckpointError(f"{repo_id}: not a local path, and the hub has no such model ({error})") from None
    except hub_errors.GatedRepoError:
        raise CheckpointError(f"{repo_id}: gated on the hub; run `hf auth login` with access first") from None
    except offline_errors:
        raise CheckpointError(
            f"{repo_id}: not a local path, and the Hugging Face hub cannot be reached (offline). "
            "Download the model where you are online and pass its directory."
        ) from None
    return local


def gguf_to_safetensors(path: Path, cache_dir: Path | None = None) -> Path:
    """Dequantise a GGUF file once (transformers does the dequantisation) into a cached HF directory."""
    path = path.resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache_root = cache_dir or Path(os.environ.get("POSTHOC_CACHE", Path.home() / ".cache" / "posthoc"))
    target = cache_root / "gguf" / f"{path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as error:  # pragma: no cover - transformers is a dependency
        raise CheckpointError(f"{path}: reading GGUF needs transformers ({error})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as error:  # transformers raises many types here; say which file and why
        raise CheckpointError(f"{path}: transformers cannot dequantise this GGUF file ({error})") from None
    state = model.state_dict()
    if model.config.tie_word_embeddings:  # stored once, as transformers' save_pretrained would
        state.pop("lm_head.weight", None)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in state.items()]
    with CheckpointWriter(target, specs, force=True, protect=[path]) as writer:
        for name, tensor in state.items():
            writer.write(name, tensor)
        writer.add_json("config.json", config)
        writer.add_json("posthoc_provenance.json", {"converted_from": str(path), "by": "transformers GGUF"})
        tokenizer.save_pretrained(writer.staging)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(writer.staging)
        writer.commit()
    return target


# --------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class TensorSpec:
    """An output tensor as planned before its data exists."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = dtype_size(self.dtype)
        for s in self.shape:
            n *= s
        return n


def check_output_location(out_dir: Path, inputs: Iterable[Path], force: bool) -> Path:
    """Refuse an existing output (unless force) and any output inside, equal to or around an input."""
    out_dir = Path(out_dir).expanduser().resolve()
    for item in inputs:
        item = Path(item).resolve()
        directory = item if item.is_dir() else item.parent
        if out_dir == directory or directory in out_dir.parents:
            raise OutputError(f"{out_dir}: is inside the input {directory}; choose an output elsewhere")
        if out_dir in item.parents:
            raise OutputError(f"{out_dir}: contains the input {item}; choose an output elsewhere")
    if out_dir.exists() and not force:
        raise OutputError(f"{out_dir}: already exists; pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory")
    return out_dir


def replace_directory(staging: Path, out_dir: Path) -> None:
    """Rename a finished staging directory to `out_dir`; an existing `out_dir` (the caller checked `force`) is
    moved aside first and removed after, so at every moment one complete version is in place."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.posthoc-old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_abandoned_staging(out_dir: Path) -> None:
    """Delete temporary directories of earlier writes to `out_dir` whose process is gone (killed runs)."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.posthoc-tmp-*"):
        pid = stale.name.rsplit("posthoc-tmp-", 1)[1].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:  # alive, owned by someone else
            pass


class CheckpointWriter:
    """Atomic, streaming writer of a sharded safetensors checkpoint plus its side files.

    Usage::

        with CheckpointWriter(out, specs, protect=inputs) as w:
            for spec in specs:
                w.write(spec.name, tensor)   # any order
            w.add_json("config.json", config)
            w.commit()                      # rename into place; without it nothing appears
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        specs: Sequence[TensorSpec],
        *,
        shard_size: int = DEFAULT_SHARD_SIZE,
        force: bool = False,
        protect: Iterable[Path] = (),
        weights_name: str = "model",
        metadata: dict[str, str] | None = None,
    ):
        if shard_size <= 0:
            raise OutputError(f"shard size must be positive, got {shard_size}")
        self.out_dir = check_output_location(Path(out_dir), protect, force)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_staging(self.out_dir)
        self.staging = self.out_dir.parent / f".{self.out_dir.name}.posthoc-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.staging.mkdir()
        self._specs = {s.name: s for s in specs}
        if len(self._specs) != len(specs):
            raise OutputError("two output tensors have the same name")
        self._pending = set(self._specs)
        self._committed = False
        try:
            self._layout(list(specs), shard_size, weights_name, metadata or {"format": "pt"})
        except BaseException:
            self.abort()
            raise

    def _layout(
        self, specs: list[TensorSpec], shard_size: int, weights_name: str, metadata: dict[str, str]
    ) -> None:
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in specs:
            if shards[-1] and size + spec.nbytes > shard_size:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        count = len(shards)
        self.weight_map: dict[str, str] = {}
        self._location: dict[str, tuple[int, int]] = {}  # name -> (fd, absolute offset)
        self._fds: list[int] = []
        for i, shard in enumerate(shards):
            file_name = (
                f"{weights_name}.safetensors"
                if count == 1
                else f"{weights_name}-{i + 1:05d}-of-{count:05d}.safetensors"
            )
            header: dict[str, Any] = {"__metadata__": metadata}
            offset = 0
            for spec in shard:
                header[spec.name] = {
                    "dtype": DTYPE_NAMES[spec.dtype],
                    "shape": list(spec.shape),
                    "data_offsets": [offset, offset + spec.nbytes],
                }
                offset += spec.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            fd = os.open(self.staging / file_name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, struct.pack("<Q", len(raw)) + raw, 0)
            data_start = 8 + len(raw)
            os.ftruncate(fd, data_start + offset)
            for spec in shard:
                self.weight_map[spec.name] = file_name
                self._location[spec.name] = (fd, data_start + header[spec.name]["data_offsets"][0])
        self.total_size = sum(s.nbytes for s in specs)
        self.weights_name = weights_name
        self.num_shards = count

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Stream one planned tensor to its place in its shard."""
        spec = self._specs.get(name)
        if spec is None:
            raise OutputError(f"tensor {name!r} is not in the output plan")
        if name not in self._pending:
            raise OutputError(f"tensor {name!r} was written twice")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise OutputError(
                f"tensor {name!r}: planned {list(spec.shape)} {spec.dtype}, got {list(tensor.shape)} {tensor.dtype}"
            )
        fd, offset = self._location[name]
        raw = memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(raw):
            done += os.pwrite(fd, raw[done:], offset + done)
        self._pending.discard(name)

    def add_json(self, file_name: str, obj: Any) -> None:
        (self.staging / file_name).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")

    def add_file(self, source: Path, file_name: str | None = None) -> None:
        shutil.copyfile(source, self.staging / (file_name or source.name))

    def commit(self) -> Path:
        """Check every tensor arrived, write the index, and move the directory into place."""
        if self._pending:
            missing = sorted(self._pending)
            self.abort()
            raise OutputError(f"{len(missing)} planned tensors were never written, e.g. {missing[0]!r}")
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if self.num_shards > 1:
            self.add_json(
                f"{self.weights_name}.safetensors.index.json",
                {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map},
            )
        replace_directory(self.staging, self.out_dir)
        self._committed = True
        return self.out_dir

    def abort(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            self.abort()


def save_state_dict(
    state: dict[str, torch.Tensor],
    out_dir: str | os.PathLike[str],
    *,
    config: dict[str, Any] | None = None,
    copy_from: Path | None = None,
    force: bool = False,
    protect: Iterable[Path] = (),
    shard_size: int = DEFAULT_SHARD_SIZE,
    extra_json: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
    weights_name: str = "model",
) -> Path:
    """Write an in-memory state dict as a checkpoint (for small outputs: fine-tunes, converted models, modules);
    `extra_json` / `extra_files` are written beside it as JSON / text."""
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in state.items()]
    with CheckpointWriter(
        out_dir, specs, force=force, protect=protect, shard_size=shard_size, weights_name=weights_name
    ) as writer:
        for name, tensor in state.items():
            writer.write(name, tensor)
        if copy_from is not None:
            copy_side_files(copy_from, writer, config_from=None if config is not None else copy_from)
        if config is not None:
            writer.add_json("config.json", config)
        for file_name, obj in (extra_json or {}).items():
            writer.add_json(file_name, obj)
        for file_name, text in (extra_files or {}).items():
            (writer.staging / file_name).write_text(text)
        return writer.commit()


def copy_side_files(
    tokenizer_from: Path | None, writer: CheckpointWriter, *, config_from: Path | None
) -> list[str]:
    """Copy config/generation config (from `config_from`) and tokenizer files (from `tokenizer_from`)."""
    copied = []
    if config_from is not None:
        for name in CONFIG_FILES:
            if (config_from / name).is_file():
                writer.add_file(config_from / name)
                copied.append(name)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_from / name).is_file():
                writer.add_file(tokenizer_from / name)
                copied.append(name)
    return copied
