"""Apply modules to a base: θ = θ₀ + Σ sᵢ φᵢ, lazily (a checkpoint-like view) or into a checkpoint (`stack`).

`AppliedCheckpoint` is a `Checkpoint` whose `read(name, rows)` returns base + scaled changes, one tensor
(or one block of rows) at a time. The merge engine opens every input through `open_model_ref`, so a
merge config may name modules next to checkpoints (`models: [{model: modules/task-a}]`, with its base from
`base_model` or the module's manifest) or mergekit's `BASE+ADAPTER` form, and the engine merges them
unchanged: it only ever sees checkpoints.

`stack` writes the applied model as a plain checkpoint that transformers loads (the base's names, shapes,
dtypes, config and tokenizer), streaming and atomically; with `as_module` it writes the combined change
Σ sᵢ φᵢ as one module instead (see `posthoc.modules.combine.combine`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posthoc.checkpoint import (
    DEFAULT_SHARD_SIZE,
    Checkpoint,
    CheckpointView,
    CheckpointWriter,
    TensorSpec,
    check_output_location,
    copy_side_files,
    open_checkpoint,
)
from posthoc.errors import ConfigError, OutputError
from posthoc.modules.combine import combine
from posthoc.modules.format import MERGE_REMEDY, MISMATCH_REMEDY, ModuleError, fingerprint, is_module
from posthoc.modules.masks import is_mask_module, open_masked
from posthoc.modules.module import Module, open_module
from posthoc.progress import progress_bar
from posthoc.provenance import stamp


class AppliedCheckpoint(CheckpointView):
    """A base with modules applied, read lazily: `read(name, rows)` = θ₀ + Σ sᵢ φᵢ for that tensor (rows).

    Same interface as a Checkpoint (tensors, read, config, directory, source, architecture, close); the
    tensors keep the base's dtypes (the sum is computed in float32, or float64 for a float64 base).
    """

    def __init__(self, base: Checkpoint, modules: Sequence[tuple[Module, float]], source: str, warnings: list[str]):
        # Nothing of its own to open: the base and the modules are opened already.
        super().__init__(base, source, warnings)
        self.modules = list(modules)

    def __repr__(self) -> str:
        return f"AppliedCheckpoint({self.source!r}, {len(self.modules)} module(s) on {self.base.source!r})"

    def touched(self, name: str) -> bool:
        return any(name in module.manifest.tensors for module, _ in self.modules)

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        value = self.base.read(name, rows)
        touching = [(m, s) for m, s in self.modules if name in m.manifest.tensors]
        if not touching:
            return value
        compute = torch.float64 if value.dtype == torch.float64 else torch.float32
        out = value.to(compute)
        for module, scale in touching:
            out.add_(module.delta(name, self.base, rows).to(compute), alpha=scale)
        return out.to(value.dtype)

    def close(self) -> None:
        for module, _ in self.modules:
            module.close()
        super().close()


def open_applied(
    base: str | os.PathLike[str] | Checkpoint,
    modules: Sequence[str | os.PathLike[str] | Module],
    scales: Sequence[float] | None = None,
    *,
    allow_base_mismatch: bool = False,
    source: str | None = None,
    remedy: str = MISMATCH_REMEDY,
) -> AppliedCheckpoint:
    """Open a base with modules applied; every module is checked against the base first (fingerprint,
    tensor names, shapes). A fingerprint mismatch is refused naming both, unless `allow_base_mismatch`."""
    scales = list(scales) if scales is not None else [1.0] * len(modules)
    opened_base = base if isinstance(base, Checkpoint) else _open_base(base)
    opened: list[tuple[Module, float]] = []
    try:
        actual = fingerprint(opened_base)
        warnings: list[str] = []
        for spec, scale in zip(modules, scales):
            module = spec if isinstance(spec, Module) else open_module(spec)
            opened.append((module, float(scale)))
            warnings += module.check_base(opened_base, fingerprint=actual, allow_mismatch=allow_base_mismatch,
                                          remedy=remedy)
    except BaseException:
        for module, _ in opened:
            module.close()
        if not isinstance(base, Checkpoint):
            opened_base.close()
        raise
    names = "+".join(m.source for m, _ in opened)
    return AppliedCheckpoint(opened_base, opened, source or f"{opened_base.source}+{names}", warnings)


def _open_base(spec: str | os.PathLike[str]) -> Checkpoint:
    if is_module(spec) and Path(spec).is_dir():
        raise ModuleError(f"{spec}: is a module, not a model; the base must be a checkpoint")
    return open_checkpoint(spec)


def split_ref(ref: str) -> tuple[str, str] | None:
    """mergekit's `MODEL+ADAPTER` reference: (model, module) when the part after a '+' is a module directory."""
    for i, char in enumerate(ref):
        if char == "+" and 0 < i < len(ref) - 1 and is_module(ref[i + 1 :]) and Path(ref[i + 1 :]).is_dir():
            return ref[:i], ref[i + 1 :]
    return None


def module_base(module_ref: str, base_model: str | None) -> str:
    """The base a bare module reference is applied to: the configured base, else its manifest's source."""
    if base_model is not None:
        return base_model
    with open_module(module_ref) as module:
        source = module.manifest.base.source
    if source and Path(source).exists():
        return source
    raise ModuleError(
        f"{module_ref}: a module needs its base model; give base_model (--base) or write BASE+{module_ref}"
        + (f" (its manifest names {source!r}, which is not here)" if source else "")
    )


def open_model_ref(ref: str, base_model: str | None = None) -> Checkpoint:
    """What a merge input reference names: a checkpoint, `MODEL+MODULE`, or a module applied to the base."""
    path = Path(ref).expanduser()
    if path.is_dir() and is_module(path):
        if base_model is not None and ref == base_model:
            raise ModuleError(f"{ref}: is a module, not a model; base_model must be a checkpoint")
        return open_applied(module_base(ref, base_model), [ref], source=ref, remedy=MERGE_REMEDY)
    if not path.exists():
        parts = split_ref(ref)
        if parts is not None:
            return open_applied(parts[0], [parts[1]], source=ref, remedy=MERGE_REMEDY)
    return open_checkpoint(ref)


# ------------------------------------------------------------------------------------------------ stack


@dataclass
class StackResult:
    out_dir: Path
    as_module: bool
    kind: str  # "checkpoint" or the module kind
    num_tensors: int  # tensors the modules changed
    seconds: float
    total_bytes: int
    warnings: list[str] = field(default_factory=list)
    refactor_error: float | None = None  # largest relative error of a LoRA re-factoring (as_module with rank)


def check_scales(scales: Sequence[float] | None, count: int) -> list[float]:
    if count == 0:
        raise ConfigError("give at least one --module to stack")
    if scales is None or len(scales) == 0:
        return [1.0] * count
    if len(scales) != count:
        raise ConfigError(f"give one --scale per --module ({count}), got {len(scales)}")
    for scale in scales:
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise ConfigError(f"The 'scale' parameter of stack must be a finite number. Got {scale!r} instead.")
    return [float(s) for s in scales]


def stack(
    base: str | os.PathLike[str],
    modules: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    scales: Sequence[float] | None = None,
    as_module: bool = False,
    allow_base_mismatch: bool = False,
    rank: int | None = None,
    force: bool = False,
    progress: bool = True,
    shard_size: int = DEFAULT_SHARD_SIZE,
    mask_mode: str = "keep",
) -> StackResult:
    """θ = θ₀ + Σ sᵢ φᵢ into a checkpoint (or, with `as_module`, Σ sᵢ φᵢ into one module).

    Mask modules (kind "mask": clusters, subnetworks) multiply instead of adding: they are applied after the
    sum, θ = M ⊙ (θ₀ + Σ sᵢ φᵢ), keeping ("keep") or zeroing ("remove") what they mark; they take no scale.

    Everything is checked before anything is written: scales, every module against the base, the output
    location. Inputs are never modified; the output appears only when complete.
    """
    started = time.perf_counter()
    scales = check_scales(scales, len(modules))
    if rank is not None and not as_module:
        raise ConfigError("--rank applies to --as-module (the combined LoRA's rank)")
    masks = [m for m in modules if not isinstance(m, Module) and is_mask_module(m)]
    if masks and as_module:
        raise ConfigError(f"{masks[0]}: a mask module multiplies the weights and cannot be summed into a module; "
                          "stack it into a checkpoint (without --as-module)")
    if any(s != 1.0 for m, s in zip(modules, scales) if m in masks):
        raise ConfigError(f"{masks[0]}: a mask module takes no --scale (give 1, or choose --mask-mode keep|remove)")
    scales = [s for m, s in zip(modules, scales) if m not in masks]
    modules = [m for m in modules if m not in masks]
    if as_module:
        result = combine(
            base, modules, scales, out_dir, rank=rank, allow_base_mismatch=allow_base_mismatch, force=force,
            progress=progress, shard_size=shard_size, provenance={"made_by": "posthoc stack --as-module"},
        )
        return StackResult(result.out_dir, True, result.kind, result.num_tensors, time.perf_counter() - started,
                           result.total_bytes, result.warnings, result.refactor_error)
    with open_applied(base, modules, scales, allow_base_mismatch=allow_base_mismatch) as applied:
        view = open_masked(applied, masks, mask_mode, allow_base_mismatch=allow_base_mismatch) if masks else applied
        warnings = applied.warnings + (view.warnings if masks else [])
        inputs = [applied.base.directory, *(m.path for m, _ in applied.modules), *(Path(m) for m in masks)]
        check_output_location(Path(out_dir), inputs, force)
        specs = [TensorSpec(name, info.shape, info.dtype) for name, info in applied.tensors.items()]
        changed = [name for name in applied.tensors if view.touched(name)]
        with CheckpointWriter(out_dir, specs, force=force, protect=inputs, shard_size=shard_size) as writer:
            with progress_bar(len(specs), "stack", "tensor", enabled=progress) as bar:
                for spec in specs:
                    tensor = view.read(spec.name)
                    if spec.name in changed and not bool(torch.isfinite(tensor).all()):
                        raise OutputError(f"tensor {spec.name}: θ₀ + Σ sᵢφᵢ is not finite (scales too large?); nothing was written")
                    writer.write(spec.name, tensor)
                    bar.update(1)
            copy_side_files(applied.base.directory, writer, config_from=applied.base.directory)
            writer.add_json(
                "posthoc_stack.json",
                {
                    **stamp(),
                    "base": applied.base.source,
                    "modules": [{"module": m.source, "kind": m.kind, "scale": s,
                                 "tags": m.manifest.tags} for m, s in applied.modules]
                    + [{"module": where, "kind": "mask", "mode": mode, "tags": manifest.tags}
                       for manifest, _, mode, where in (view.masks if masks else [])],
                    "warnings": warnings,
                },
            )
            out = writer.commit()
            total = writer.total_size
        return StackResult(out, False, "checkpoint", len(changed), time.perf_counter() - started, total, warnings)


def read_stack_record(directory: str | os.PathLike[str]) -> dict | None:
    path = Path(directory) / "posthoc_stack.json"
    return json.loads(path.read_text()) if path.is_file() else None
