"""The streaming merge engine: per output tensor, read the inputs, merge, write, free.

Memory stays flat in the model size: at any time the engine holds the inputs and results of the few
tensors being merged at once (one per worker thread, within a byte budget; see `split_threads`).
Methods that read their inputs by chunks of rows get very large inputs as lazy readers (`LazyTensor`), so
even an embedding matrix is never in memory N times over. Everything that can fail is checked before
any math (configuration, compatibility, every parameter of every tensor), and the output appears only
when every tensor has been written and verified finite.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posthoc import checkpoint as ckpt_io
from posthoc.compat import CompatReport, check_compatible
from posthoc.errors import ConfigError, IncompatibleError, OutputError
from posthoc.merge import methods as _methods  # noqa: F401  (registers the methods)
from posthoc.merge.config import MergeConfig, layer_position, num_layers
from posthoc.merge.modules import merge_modules, wants_module_output
from posthoc.merge.result import MergeResult, tensor_seed
from posthoc.merge.vocab import VocabularyAlignment
from posthoc.modules.apply import open_model_ref
from posthoc.progress import progress_bar
from posthoc.provenance import stamp
from posthoc.sparsify import row_chunks
from posthoc.threads import torch_threads

log = logging.getLogger(__name__)

IN_FLIGHT_BYTES = 128 * 1024 * 1024  # inputs held at once by the tensors being merged (one larger runs alone)
MAX_JOBS = 4  # tensors merged at once, at most
LAZY_BYTES = 32 * 1024 * 1024  # inputs larger than this stay on disk for methods that read row chunks


class LazyTensor:
    """A stored tensor left on disk; a method that reads row chunks gets its rows when it slices them.

    Supports what such methods use: `shape`, `dtype`, `numel()`, `dim()` and `reshape(-1)[start:stop]` with
    slices of whole rows (others read the covering rows and cut), memory-mapped (see `Checkpoint.read_mapped`).
    """

    def __init__(self, ckpt: ckpt_io.Checkpoint, name: str, dtype: torch.dtype | None):
        info = ckpt.tensors[name]
        self._ckpt, self._name, self._cast = ckpt, name, dtype
        self.shape = torch.Size(info.shape)
        self.dtype = dtype or info.dtype
        self._row = math.prod(info.shape[1:])

    def numel(self) -> int:
        return math.prod(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def reshape(self, *shape: int) -> LazyTensor:
        if shape not in ((-1,), ((-1,),)):
            raise ValueError("a LazyTensor only reshapes to a flat view")
        return self

    def __getitem__(self, flat: slice) -> torch.Tensor:
        start, stop, _ = flat.indices(self.numel())
        first, last = start // self._row, -(-stop // self._row)
        rows = self._ckpt.read_mapped(self._name, slice(first, last)).reshape(-1)
        if self._cast is not None:
            rows = rows.to(self._cast)
        return rows[start - first * self._row : stop - first * self._row]


def merge(
    config: MergeConfig,
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    shard_size: int = ckpt_io.DEFAULT_SHARD_SIZE,
    seed: int | None = None,
    progress: bool = True,
    lazy_bytes: int = LAZY_BYTES,
    rank: int | None = None,
    threads: int | None = None,
) -> MergeResult:
    """Merge the checkpoints a config names into `out_dir` (atomically; nothing appears on failure).

    `threads`: CPU threads to use (default: torch's setting), shared between tensors merged at once.

    Inputs may also be modules (see posthoc.modules.apply.open_model_ref). When every merged input is a
    module, the output is a module (posthoc.merge.modules); `rank` re-factors an all-LoRA output."""
    if wants_module_output(config):
        return merge_modules(config, out_dir, force=force, seed=seed, progress=progress, rank=rank, shard_size=shard_size)
    if rank is not None:
        raise ConfigError("--rank applies when every merged input is a LoRA module (the output is then a LoRA module)")
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        inputs = _open_inputs(config, stack)
        # The output location is checked before any heavy work, and again by the writer.
        ckpt_io.check_output_location(Path(out_dir), inputs.directories, force)
        report, donor, alignment = _check_inputs(config, inputs, stack)
        plan = _plan(config, inputs, alignment, seed, lazy_bytes)
        merger = _TensorMerger(config, inputs, alignment, plan)
        with ckpt_io.CheckpointWriter(
            out_dir, plan.specs, shard_size=shard_size, force=force, protect=inputs.directories
        ) as writer:
            _merge_all(merger, writer, threads, progress)
            _write_side_files(writer, config, inputs, donor, alignment, plan, shard_size)
            writer.commit()
        return MergeResult(
            out_dir=writer.out_dir,
            seconds=time.perf_counter() - started,
            num_tensors=len(plan.specs),
            total_bytes=writer.total_size,
            num_shards=writer.num_shards,
            seed=plan.seed,
            report=report,
            warnings=report.warnings,
        )


# ------------------------------------------------------------------------------------------- the steps of a merge


@dataclass
class _Inputs:
    """The opened inputs of a merge, each reference once: the base apart (None when absent or ignored)."""

    opened: dict[str, ckpt_io.Checkpoint]  # by reference, base first
    base: ckpt_io.Checkpoint | None
    inputs: list[ckpt_io.Checkpoint]  # the merged inputs, in config order
    base_ref: str | None
    models: list[str]  # the merged inputs' references

    @property
    def reference(self) -> ckpt_io.Checkpoint:
        """The checkpoint whose names, shapes and config the output follows."""
        return self.base if self.base is not None else self.inputs[0]

    @property
    def directories(self) -> list[Path]:
        return [c.directory for c in self.opened.values()]


def _open_inputs(config: MergeConfig, stack: contextlib.ExitStack) -> _Inputs:
    """Open every input once, each closed with `stack`: a checkpoint, `MODEL+MODULE`, or a module applied to
    base_model (posthoc.modules), which the engine then reads like any checkpoint."""
    base_ref, entries = config.inputs()
    opened: dict[str, ckpt_io.Checkpoint] = {}

    def open_once(ref: str) -> ckpt_io.Checkpoint:
        if ref not in opened:
            opened[ref] = stack.enter_context(open_model_ref(ref, config.base_model))
        return opened[ref]

    base = open_once(base_ref) if base_ref is not None else None
    inputs = [open_once(entry.model) for entry in entries]
    return _Inputs(opened, base, inputs, base_ref, [e.model for e in entries])


def _check_inputs(
    config: MergeConfig, inputs: _Inputs, stack: contextlib.ExitStack
) -> tuple[CompatReport, ckpt_io.Checkpoint, VocabularyAlignment | None]:
    """(compatibility report, tokenizer donor, vocabulary alignment): raises on the first problem.

    The vocabularies are aligned when a `tokenizer_source` is configured and their sizes differ; the
    donor is the checkpoint whose tokenizer files are copied (the reference unless configured)."""
    opened, reference = list(inputs.opened.values()), inputs.reference
    # Tokenizers are only loaded when vocabularies must be aligned (`posthoc check` reports their sizes).
    report = check_compatible(opened, reference=reference, with_tokenizer=False)
    alignment = None
    donor = reference
    source = config.tokenizer_source
    if source is not None:
        if source != "base":
            donor = inputs.opened.get(source) or stack.enter_context(ckpt_io.open_checkpoint(source))
        if report.vocab_mismatch:
            alignment = VocabularyAlignment.build(donor, reference, opened)
            report.vocabulary_aligned()
    if report.problems:
        more = f" (and {len(report.problems) - 1} more problems; run `posthoc check`)" if len(report.problems) > 1 else ""
        raise IncompatibleError(report.problems[0] + more)
    return report, donor, alignment


@dataclass
class _Plan:
    """Everything decided before any math: per tensor its parameters, its output spec, and whether its inputs
    stay on disk as lazy row readers."""

    names: list[str]  # in the reference's order
    params: dict[str, dict[str, Any]]  # the method's keyword arguments per tensor
    specs: list[ckpt_io.TensorSpec]
    lazy: set[str]
    seed: int | None


def _plan(
    config: MergeConfig, inputs: _Inputs, alignment: VocabularyAlignment | None, seed: int | None, lazy_bytes: int
) -> _Plan:
    """Resolve and validate every parameter of every tensor, and draw the seed a randomized method needs."""
    method, reference = config.method, inputs.reference
    names = list(reference.tensors)
    layers = num_layers(reference.config, names)
    params = {name: config.resolve(name, layer_position(name, layers)) for name in names}
    if method.randomized and seed is None:
        seed = secrets.randbits(31)
    merged = [*([inputs.base] if inputs.base is not None else []), *inputs.inputs]
    specs = []
    for name in names:
        infos = [c.tensors[name] for c in merged]
        shape = alignment.shape(name, reference.tensors[name].shape) if alignment else reference.tensors[name].shape
        if infos[0].dtype.is_floating_point:
            out_dtype = config.out_dtype or config.dtype or _promote([i.dtype for i in infos])
        else:
            out_dtype = infos[0].dtype
        specs.append(ckpt_io.TensorSpec(name, tuple(shape), out_dtype))

    def lazy(info: ckpt_io.TensorInfo, name: str) -> bool:
        return (
            method.reads_row_chunks
            and info.nbytes > lazy_bytes
            and len(info.shape) >= 1
            and info.dtype.is_floating_point
            and not (alignment is not None and alignment.covers(name))
        )

    return _Plan(names, params, specs, {name for name in names if lazy(reference.tensors[name], name)}, seed)


class _TensorMerger:
    """Reads, merges and writes one tensor; called from the worker threads, which a byte budget bounds in the
    inputs they hold at once."""

    def __init__(self, config: MergeConfig, inputs: _Inputs, alignment: VocabularyAlignment | None, plan: _Plan):
        self.config, self.inputs, self.alignment, self.plan = config, inputs, alignment, plan
        self.out_dtypes = {spec.name: spec.dtype for spec in plan.specs}
        self.budget = _ByteBudget(IN_FLIGHT_BYTES)

    def __call__(self, writer: ckpt_io.CheckpointWriter, name: str) -> None:
        inputs = self.inputs
        size = 0 if name in self.plan.lazy else inputs.reference.tensors[name].nbytes * len(inputs.opened)
        with self.budget.hold(size):
            base, tensors = self.load(name)
            out = _merge_one(
                self.config, name, base, tensors, self.plan.params[name], self.plan.seed, inputs.models,
                inputs.base_ref, self.out_dtypes[name],
            )
            writer.write(name, out.to(self.out_dtypes[name]))

    def load(self, name: str) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(base, merged inputs) of one tensor: lazy readers, or mapped tensors aligned and rounded as configured."""
        config, opened, base = self.config, self.inputs.opened, self.inputs.base
        if name in self.plan.lazy:
            raw = {source: LazyTensor(c, name, config.dtype) for source, c in opened.items()}
        else:
            raw = {source: c.read_mapped(name) for source, c in opened.items()}
            if self.alignment is not None and self.alignment.covers(name):
                raw = self.alignment.align(raw, base.source if base is not None else None)
            if config.dtype is not None:  # round the inputs as the config asks, like mergekit
                raw = {k: t.to(config.dtype) if t.dtype.is_floating_point else t for k, t in raw.items()}
        return (raw[base.source] if base is not None else None), [raw[c.source] for c in self.inputs.inputs]


def _merge_all(merger: _TensorMerger, writer: ckpt_io.CheckpointWriter, threads: int | None, progress: bool) -> None:
    """Merge every tensor into the writer, `jobs` at a time, each on its own share of the threads.

    Reads, histograms and writes are single-threaded, so whole tensors in parallel keep every core busy where
    parallelism inside each operation leaves one idle. Largest first, so that no big tensor is left for the
    end while the other workers idle."""
    jobs, threads_each = split_threads(threads or torch.get_num_threads())
    reference = merger.inputs.reference
    names = merger.plan.names
    with (
        torch_threads(threads_each),
        ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="posthoc-merge") as pool,
    ):
        largest_first = sorted(names, key=lambda name: reference.tensors[name].nbytes, reverse=True)
        futures = [pool.submit(merger, writer, name) for name in largest_first]
        with progress_bar(len(names), f"merge ({merger.config.method.name})", "tensor", enabled=progress) as bar:
            try:
                for future in futures:
                    future.result()
                    bar.update(1)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise


def _write_side_files(
    writer: ckpt_io.CheckpointWriter,
    config: MergeConfig,
    inputs: _Inputs,
    donor: ckpt_io.Checkpoint,
    alignment: VocabularyAlignment | None,
    plan: _Plan,
    shard_size: int,
) -> None:
    """Tokenizer files, config.json (with the written dtype), generation_config.json and the provenance."""
    reference = inputs.reference
    copied = ckpt_io.copy_side_files(donor.directory, writer, config_from=None)
    output_config = dict(reference.config)
    if output_config:
        floating = next((spec.dtype for spec in plan.specs if spec.dtype.is_floating_point), torch.float32)
        dtype_name = str(config.out_dtype or config.dtype or floating).replace("torch.", "")
        output_config["dtype" if "dtype" in output_config else "torch_dtype"] = dtype_name
        if alignment is not None:
            output_config["vocab_size"] = alignment.rows
        writer.add_json("config.json", output_config)
    if (reference.directory / "generation_config.json").is_file():
        writer.add_file(reference.directory / "generation_config.json")
    writer.add_json(
        "posthoc_merge.json",
        {
            **stamp(),
            "method": config.method.name,
            "paper": config.method.paper,
            "base_model": inputs.base_ref,
            "models": inputs.models,
            "config": config.to_dict(),
            "seed": plan.seed,
            "shard_size": shard_size,
            "tokenizer_files_from": str(donor.directory) if copied else None,
            "vocabulary_aligned": alignment is not None,
        },
    )
    if config.source_text:
        (writer.staging / "posthoc_merge.yml").write_text(config.source_text)


def _promote(dtypes: list[torch.dtype]) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


_EXPONENT_BITS = {  # an IEEE float is Inf or NaN exactly when all its exponent bits are set
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float16: (torch.int16, 0x7C00),
    torch.float32: (torch.int32, 0x7F800000),
    torch.float64: (torch.int64, 0x7FF0000000000000),
}


def all_finite(tensor: torch.Tensor) -> bool:
    """No Inf/NaN. By chunks of 1M entries: a chunk whose sum is finite holds no Inf/NaN (they propagate
    through a sum), and a sum is much cheaper than `isfinite`; a non-finite sum (a NaN, or an overflow of
    the sum, e.g. in float16) is settled on the bit patterns."""
    if not tensor.dtype.is_floating_point:
        return True
    flat = tensor.reshape(-1)
    for s in row_chunks((flat.numel(),), 1 << 20):
        chunk = flat[s]
        if bool(torch.isfinite(chunk.sum())):
            continue
        if tensor.dtype not in _EXPONENT_BITS:
            return bool(torch.isfinite(chunk).all())
        int_dtype, exponent = _EXPONENT_BITS[tensor.dtype]
        if bool(((chunk.view(int_dtype) & exponent) == exponent).any()):
            return False
    return True


def split_threads(threads: int) -> tuple[int, int]:
    """(tensors merged at once, intra-op threads each) for this many threads."""
    threads = max(1, threads)
    jobs = min(MAX_JOBS, threads)
    return jobs, max(1, threads // jobs)


class _ByteBudget:
    """Bounds the bytes of inputs held by tensors in flight: a tensor waits until its inputs fit beside the
    others', and one larger than the whole budget runs alone."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, size: int) -> Iterator[None]:
        size = min(size, self.limit)
        with self._changed:
            self._changed.wait_for(lambda: self.used == 0 or self.used + size <= self.limit)
            self.used += size
        try:
            yield
        finally:
            with self._changed:
                self.used -= size
                self._changed.notify_all()


def _merge_one(
    config: MergeConfig,
    name: str,
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    params: dict[str, Any],
    seed: int | None,
    models: list[str],
    base_ref: str | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    method = config.method
    every = [*([base] if base is not None else []), *tensors]
    if not every[0].dtype.is_floating_point:  # integer buffers (position ids …) must agree; copied
        for tensor, model in zip(tensors, models):
            if not torch.equal(tensor, every[0]):
                raise IncompatibleError(f"tensor {name}: integer tensor differs in {model}; it cannot be merged")
        return every[0]
    kwargs = dict(params)
    if method.randomized:
        kwargs["generator"] = torch.Generator().manual_seed(tensor_seed(seed or 0, name))
    if method.takes_out_dtype:
        kwargs["out_dtype"] = out_dtype
    out = method.merge_tensor(name, tensors, base, **kwargs)
    if not all_finite(out):
        sources = [*([base_ref] if base is not None else []), *models]
        culprits = [m for m, t in zip(sources, every) if not torch.isfinite(t.reshape(-1)[0 : t.numel()]).all()]
        why = f"input {culprits[0]} already holds NaN/Inf there" if culprits else "check weights that sum to zero with normalize"
        raise OutputError(f"tensor {name}: {method.name} produced NaN/Inf ({why}); nothing was written")
    return out
