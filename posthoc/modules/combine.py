"""Write a module tensor by tensor from per-tensor plans: Σ cᵢφᵢ (exact for LoRA factors) or a function of the changes."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posthoc.checkpoint import DEFAULT_SHARD_SIZE, Checkpoint, open_checkpoint
from posthoc.errors import ConfigError
from posthoc.modules import lowrank
from posthoc.modules.build import ModuleBuilder
from posthoc.modules.format import MERGE_REMEDY, BaseRef, ModuleError, fingerprint, is_module
from posthoc.modules.module import Module, open_module
from posthoc.modules.peft_format import BaseLayout
from posthoc.progress import progress_bar


@dataclass
class CombinedModule:
    """A module written by `write_combined`: where, how big, and how exact."""

    out_dir: Path
    seconds: float
    num_tensors: int
    total_bytes: int
    num_shards: int
    kind: str = "delta"
    refactor_error: float | None = None  # largest relative error of a LoRA re-factoring, None when exact
    warnings: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        return module_summary(self.kind, self.refactor_error)


def module_summary(kind: str, refactor_error: float | None) -> str:
    """One line on a written module: its kind and how exact it is."""
    error = "exact" if not refactor_error else f"largest re-factoring error {refactor_error:.2e}"
    return f"module of kind {kind} ({error}); fidelity.json has the per-tensor figures"


@dataclass
class TensorPlan:
    """How one output tensor is computed: Σ cᵢφᵢ (`coefficients`), or `compute(name, changes)` element-wise."""

    coefficients: list[float] | None = None
    compute: Callable[[str, list[torch.Tensor]], torch.Tensor] | None = None


def output_kind(modules: Sequence[Module | None]) -> str:
    kinds = {m.kind for m in modules if m is not None}
    return kinds.pop() if len(kinds) == 1 and kinds <= {"lora", "sparse", "delta"} else "delta"


def check_rank(rank: int | None, modules: Sequence[Module | None]) -> None:
    if rank is None:
        return
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"The 'rank' parameter of merge must be an int >= 1. Got {rank!r} instead.")
    limits = [min(m.shape(n)) for m in modules if m is not None for n in m.names if m.storage(n) == "lora"]
    if limits and rank > max(limits):
        raise ConfigError(
            f"The 'rank' parameter of merge must be at most {max(limits)} (the largest rank a LoRA matrix of these "
            f"modules allows). Got {rank} instead."
        )


def resolve_base(explicit: str | Checkpoint | None, modules: Sequence[Module | None]) -> Checkpoint | None:
    if isinstance(explicit, Checkpoint):
        return explicit
    if explicit is not None:
        if is_module(explicit) and Path(explicit).is_dir():
            raise ModuleError(f"{explicit}: is a module, not a model; the base must be a checkpoint")
        return open_checkpoint(explicit)
    for module in modules:
        source = module.manifest.base.source if module is not None else ""
        if module is not None and module.manifest.base.fingerprint and source and Path(source).is_dir():
            return open_checkpoint(source)
    return None


def check_same_base(modules: Sequence[Module | None], base: Checkpoint | None) -> tuple[list[str], BaseRef | None]:
    """Every module against the base (or, without a base, against each other): refused naming both fingerprints."""
    warnings: list[str] = []
    present = [m for m in modules if m is not None]
    if base is not None:
        actual = fingerprint(base)
        for module in present:
            warnings += module.check_base(base, fingerprint=actual, remedy=MERGE_REMEDY)
        return warnings, BaseRef(base.architecture, actual, base.source, base.config.get("model_type"))
    known = [m for m in present if m.manifest.base.fingerprint]
    for module in known[1:]:
        if module.manifest.base.fingerprint != known[0].manifest.base.fingerprint:
            raise ModuleError(
                f"{module.path}: made for base {module.manifest.base.fingerprint} but {known[0].path} for "
                f"{known[0].manifest.base.fingerprint}; modules of different bases cannot be merged"
            )
    if len(known) < len(present):
        warnings.append("a PEFT adapter made elsewhere has no base fingerprint; give --base to check it")
    ref = known[0].manifest.base if known else BaseRef(None, "", "", None)
    return warnings, ref


def _merge_tensors(
    builder: ModuleBuilder,
    modules: Sequence[Module | None],
    names: list[str],
    shapes: dict[str, tuple[int, ...]],
    plan: Callable[[str], TensorPlan],
    base: Checkpoint | None,
    rank: int | None,
    progress: bool,
) -> list[dict[str, Any]]:
    """Write Σ or f of the inputs' changes tensor by tensor; returns the per-tensor fidelity records."""
    records: list[dict[str, Any]] = []
    with progress_bar(len(names), f"merge modules ({builder.kind})", "tensor", enabled=progress) as bar:
        for name in names:
            bar.update(1)
            record = _merge_tensor(builder, modules, name, shapes[name], plan, base, rank)
            if record is not None:
                records.append(record)
    return records


def _merge_tensor(
    builder: ModuleBuilder,
    modules: Sequence[Module | None],
    name: str,
    shape: tuple[int, ...],
    plan: Callable[[str], TensorPlan],
    base: Checkpoint | None,
    rank: int | None,
) -> dict[str, Any] | None:
    """One output tensor into the builder: its fidelity record, or None when its change is zero."""
    touching = [(i, m) for i, m in enumerate(modules) if m is not None and name in m.manifest.tensors]
    all_lora = bool(touching) and all(m.storage(name) == "lora" for _, m in touching)
    ranks = [m.rank(name) for _, m in touching] if all_lora else []
    layouts = {m.entry(name).get("layout", "linear") for _, m in touching} if all_lora else set()
    if len(layouts) > 1:
        raise ModuleError(f"tensor {name}: the inputs factor it in different layouts ({', '.join(sorted(layouts))})")
    layout = layouts.pop() if layouts else "linear"
    step = plan(name)
    if step.coefficients is not None:
        terms = [(step.coefficients[i], m) for i, m in touching if step.coefficients[i] != 0]
        if not terms:
            return None
        if builder.kind == "lora" and all_lora:
            return _concatenated(builder, name, terms, rank, layout)
        phi = torch.zeros(shape, dtype=torch.float32)
        for c, m in terms:
            phi.add_(m.delta(name, base), alpha=c)
    else:
        changes = [
            m.delta(name, base) if m is not None and name in m.manifest.tensors else torch.zeros(shape)
            for m in modules
        ]
        phi = step.compute(name, changes)
        del changes
    if not bool(phi.any()):
        return None
    if not bool(torch.isfinite(phi).all()):
        raise ModuleError(f"tensor {name}: the merged change is not finite (NaN/Inf); nothing was written")
    target = rank if rank is not None else min(sum(ranks), *shape) if ranks else None
    return _store(builder, name, phi, shape, target if all_lora else None, layout)


def _concatenated(
    builder: ModuleBuilder, name: str, terms: list[tuple[float, Module]], rank: int | None, layout: str
) -> dict[str, Any]:
    """Σ cᵢBᵢAᵢ of LoRA inputs, exactly as [c₁B₁ … cₙBₙ] [A₁; …; Aₙ] (re-factored when over `rank`)."""
    Bs, As = [], []
    for c, m in terms:
        B, A = m.lora_factors(name)
        Bs.append(B * c)
        As.append(A)
    total = sum(b.shape[1] for b in Bs)
    if rank is not None and total > rank:
        B, A, error = lowrank.refactor(Bs, As, rank)
    else:
        B, A, error = torch.cat(Bs, dim=1), torch.cat(As, dim=0), 0.0
    builder.lora(name, B, A, layout)
    return {"name": name, "storage": "lora", "rank": int(B.shape[1]), "relative_error": error,
            "how": "concatenated factors" + (", QR + core SVD" if error or total > B.shape[1] else "")}


def _store(
    builder: ModuleBuilder, name: str, phi: torch.Tensor, shape: tuple[int, ...], lora_rank: int | None, layout: str
) -> dict[str, Any]:
    """A merged change in the output's storage: a LoRA of `lora_rank` (all inputs LoRA, when that is smaller),
    the nonzero entries (sparse), or whole."""
    if builder.kind == "lora" and lora_rank is not None and lowrank.lora_is_smaller(shape, lora_rank):
        B, A, error = lowrank.factor(phi, lora_rank)
        builder.lora(name, B, A, layout)
        return {"name": name, "storage": "lora", "rank": int(B.shape[1]), "relative_error": error,
                "how": "formed per tensor, merged, truncated SVD"}
    if builder.kind == "sparse":
        flat = phi.reshape(-1)
        indices = torch.nonzero(flat).squeeze(1)
        builder.sparse(name, shape, indices, flat[indices])
        return {"name": name, "storage": "sparse", "nnz": int(indices.numel()), "relative_error": 0.0,
                "how": "merged, nonzero entries kept"}
    builder.dense(name, phi)
    return {"name": name, "storage": "dense", "relative_error": 0.0, "how": "merged, kept whole"}


def _finish(
    builder: ModuleBuilder, base: Checkpoint | None, records: list[dict[str, Any]], provenance: dict[str, Any],
    tags: dict[str, str] | None,
) -> float | None:
    errors = [r["relative_error"] for r in records if r.get("relative_error")]
    worst = max(errors) if errors else None
    layout = BaseLayout.of(base) if base is not None and builder.kind == "lora" else None
    builder.finish(
        base=base, layout=layout, tags=tags, provenance=provenance,
        extra_json={"fidelity.json": {"max_refactor_error": worst, "tensors": records}},
    )
    return worst


def open_modules(refs: Sequence[str | None]) -> list[Module | None]:
    opened: list[Module | None] = []
    try:
        for ref in refs:
            opened.append(open_module(ref) if ref is not None else None)
    except BaseException:
        for m in opened:
            if m is not None:
                m.close()
        raise
    return opened


def tensor_names(modules: Sequence[Module | None], base: Checkpoint | None) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for module in modules:
        if module is not None:
            for name in module.names:
                shapes.setdefault(name, module.shape(name))
    order = [n for n in base.tensors if n in shapes] if base is not None else []
    order += [n for n in shapes if n not in set(order)]
    return order, shapes


def write_combined(
    out_dir: str | Path,
    modules: Sequence[Module | None],
    base_ref: BaseRef,
    base: Checkpoint | None,
    names: list[str],
    shapes: dict[str, tuple[int, ...]],
    plan: Callable[[str], TensorPlan],
    rank: int | None,
    provenance: dict[str, Any],
    tags: dict[str, str] | None,
    *,
    warnings: list[str],
    started: float,
    force: bool,
    progress: bool,
    shard_size: int,
) -> CombinedModule:
    """Write the plans' changes tensor by tensor into one module at `out_dir` (atomically) and describe it."""
    protect = [Path(m.path) for m in modules if m is not None] + ([base.directory] if base is not None else [])
    builder = ModuleBuilder(out_dir, output_kind(modules), base_ref, force=force, protect=protect, shard_size=shard_size)
    with builder.writer:
        records = _merge_tensors(builder, modules, names, shapes, plan, base, rank, progress)
        worst = _finish(builder, base, records, provenance, tags)
        out = builder.commit()
    return CombinedModule(
        out_dir=out, seconds=time.perf_counter() - started, num_tensors=len(builder.entries),
        total_bytes=builder.writer.total_size, num_shards=builder.writer.num_shards, kind=builder.kind,
        refactor_error=worst, warnings=warnings + builder.warnings,
    )


def float_names(base: Checkpoint) -> list[str]:
    return [n for n, info in base.tensors.items() if info.dtype.is_floating_point]


def combine(
    base: str | Checkpoint | None,
    modules: Sequence[str | Path],
    scales: Sequence[float],
    out_dir: str | Path,
    *,
    rank: int | None = None,
    allow_base_mismatch: bool = False,
    force: bool = False,
    progress: bool = True,
    shard_size: int = DEFAULT_SHARD_SIZE,
    tags: dict[str, str] | None = None,
    provenance: dict[str, Any] | None = None,
) -> CombinedModule:
    """Σ sᵢφᵢ as one module (`posthoc stack --as-module`): exact for LoRA inputs unless a `rank` is asked."""
    started = time.perf_counter()
    opened = open_modules([str(m) for m in modules])
    resolved = None
    try:
        check_rank(rank, opened)
        resolved = resolve_base(base, opened)
        warnings: list[str] = []
        if resolved is not None:
            actual = fingerprint(resolved)
            for module in opened:
                warnings += module.check_base(resolved, fingerprint=actual, allow_mismatch=allow_base_mismatch)
            base_ref = BaseRef(resolved.architecture, actual, resolved.source, resolved.config.get("model_type"))
        else:
            more, base_ref = check_same_base(opened, None)
            warnings += more
        names, shapes = tensor_names(opened, resolved)
        coefficients = [float(s) for s in scales]
        info = {**(provenance or {}), "modules": [str(m) for m in modules], "scales": coefficients, "rank": rank}
        return write_combined(
            out_dir, opened, base_ref, resolved, names, shapes, lambda name: TensorPlan(coefficients=coefficients), rank,
            info, tags, warnings=warnings, started=started, force=force, progress=progress,
            shard_size=shard_size,
        )
    finally:
        for m in opened:
            if m is not None:
                m.close()
        if resolved is not None and not isinstance(base, Checkpoint):
            resolved.close()


def relative_frobenius(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (benchmarks and tests)."""
    norm = float(torch.linalg.vector_norm(b))
    return float(torch.linalg.vector_norm(a - b)) / norm if norm else math.inf
