"""Merging modules into a module: exact LoRA sums, and every registry method on the changes they make.

`posthoc merge` sends a config here when every input is a module (a configured base checkpoint may be
listed too: it is the zero change). The output is a module of the inputs' kind — lora when all are LoRA,
sparse when all are sparse, delta otherwise — written one tensor at a time. What a method is comes from
what it declares in the registry (`MergeMethod.linear`, `MergeMethod.on_task_vectors`), never from its name.
Per tensor:

- A method that declares `linear` (linear, task_arithmetic, passthrough) gives Σ cᵢφᵢ. The coefficients are
  read off the registry's own function (evaluated on unit inputs), so they mean exactly what the method
  means for checkpoints; where it is not equivariant under a shift of every input and the base with these
  parameters (linear without normalize and Σw ≠ 1, passthrough with scale ≠ 1) it is evaluated on θ₀ + φᵢ.
  For LoRA inputs the sum is exact: the factors are concatenated ([c₁B₁ … cₙBₙ], [A₁; …; Aₙ]), with
  any ranks and signs; with a target rank they are re-factored by QR + an SVD of the small core, with
  the error known exactly (`lowrank.refactor`), and the (m, n) change is never formed.
- A method that declares `on_task_vectors` (the task-arithmetic family: TIES, DARE, breadcrumbs, DELLA …)
  works element-wise: each input's change is formed for this tensor, the registry's pure function merges
  them over a zero base (f(θ₀ + φ; θ₀) − θ₀ = f(φ; 0) for these methods, and the seeds per tensor are the
  engine's, so DARE draws the same masks), and a LoRA output is re-factored by truncated SVD, its measured
  error reported.
- Other methods (slerp, multislerp, model_stock) are evaluated on θ₀ + φᵢ and the base subtracted; they
  need the base checkpoint.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posthoc.checkpoint import DEFAULT_SHARD_SIZE, Checkpoint
from posthoc.compat import CompatReport
from posthoc.merge.config import MergeConfig, layer_position, num_layers
from posthoc.merge.registry import MergeMethod
from posthoc.merge.result import MergeResult, tensor_seed
from posthoc.modules.combine import (
    CombinedModule,
    TensorPlan,
    check_rank,
    check_same_base,
    float_names,
    module_summary,
    open_modules,
    resolve_base,
    tensor_names,
    write_combined,
)
from posthoc.modules.format import ModuleError, is_module


@dataclass
class ModuleMergeResult(MergeResult):
    """A merge whose output is a module (see MergeResult for the shared fields)."""

    kind: str = "delta"
    refactor_error: float | None = None  # largest relative error of a LoRA re-factoring, None when exact

    @property
    def summary(self) -> str:
        return module_summary(self.kind, self.refactor_error)

    @classmethod
    def of(cls, written: CombinedModule, seed: int | None) -> ModuleMergeResult:
        return cls(out_dir=written.out_dir, seconds=written.seconds, num_tensors=written.num_tensors,
                   total_bytes=written.total_bytes, num_shards=written.num_shards, seed=seed, report=CompatReport([]),
                   warnings=written.warnings, kind=written.kind, refactor_error=written.refactor_error)


def wants_module_output(config: MergeConfig) -> bool:
    """Every merged input (other than the base itself) is a module or PEFT adapter directory."""
    _, entries = config.inputs()
    refs = [e.model for e in entries if e.model != config.base_model]
    return bool(refs) and all(Path(r).is_dir() and is_module(r) for r in refs)


def linear_coefficients(method: MergeMethod, params: dict[str, Any], count: int) -> list[float] | None:
    """cᵢ such that the method's output minus the base is Σ cᵢφᵢ, read off the method on unit inputs; None when
    the method does not declare `linear` or is not shift-equivariant with these parameters."""
    if not method.linear:
        return None

    def run(values: list[float], base: float) -> float:
        tensors = [torch.tensor([v], dtype=torch.float64) for v in values]
        base_t = None if method.base == "ignored" else torch.tensor([base], dtype=torch.float64)
        kwargs = dict(params)
        if method.takes_out_dtype:
            kwargs["out_dtype"] = torch.float64
        return float(method.fn(tensors, base_t, **kwargs)[0])

    if abs(run([1.0] * count, 1.0) - 1.0) > 1e-9:
        return None
    return [run([1.0 if j == i else 0.0 for j in range(count)], 0.0) for i in range(count)]


def _method_plan(
    config: MergeConfig, method: MergeMethod, count: int, base: Checkpoint | None, seed: int | None, layers: int | None
) -> Callable[[str], TensorPlan]:
    def plan(name: str) -> TensorPlan:
        params = config.resolve(name, layer_position(name, layers))
        coefficients = linear_coefficients(method, params, count)
        if coefficients is not None:
            return TensorPlan(coefficients=coefficients)
        kwargs = dict(params)
        if method.takes_out_dtype:
            kwargs["out_dtype"] = torch.float32
        if method.on_task_vectors:
            def compute(name: str, changes: list[torch.Tensor]) -> torch.Tensor:
                if method.randomized:
                    kwargs["generator"] = torch.Generator().manual_seed(tensor_seed(seed or 0, name))
                return method.merge_tensor(name, changes, torch.zeros_like(changes[0]), **kwargs).to(torch.float32)
            return TensorPlan(compute=compute)
        if base is None:
            raise ModuleError(f"merging modules with {method.name} needs the base checkpoint (base_model / --base)")

        def absolute(name: str, changes: list[torch.Tensor]) -> torch.Tensor:
            theta0 = base.read(name).to(torch.float32)
            if method.randomized:
                kwargs["generator"] = torch.Generator().manual_seed(tensor_seed(seed or 0, name))
            merged = method.merge_tensor(name, [theta0 + c for c in changes], None if method.base == "ignored" else theta0,
                                         **kwargs)
            return merged.to(torch.float32) - theta0
        return TensorPlan(compute=absolute)

    return plan


# ------------------------------------------------------------------------------------------- the loop


def merge_modules(
    config: MergeConfig,
    out_dir: str | Path,
    *,
    force: bool = False,
    seed: int | None = None,
    progress: bool = True,
    rank: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> ModuleMergeResult:
    """Merge the modules a config names into one module (see the module docstring)."""
    started = time.perf_counter()
    method = config.method
    _, entries = config.inputs()
    refs = [None if e.model == config.base_model else e.model for e in entries]
    modules = open_modules(refs)
    base = None
    try:
        check_rank(rank, modules)
        base = resolve_base(config.base_model, modules)
        warnings, base_ref = check_same_base(modules, base)
        ignored = [k for k in ("dtype", "out_dtype", "tokenizer_source") if getattr(config, k) is not None]
        if ignored:
            warnings.append(f"{', '.join(ignored)} do(es) not apply to a module output (changes are stored in float32)")
        names, shapes = tensor_names(modules, base)
        layers = num_layers(base.config if base is not None else {}, list(base.tensors) if base is not None else names)
        for name in names:  # every parameter of every tensor is resolved and checked before any math
            config.resolve(name, layer_position(name, layers))
        if method.randomized and seed is None:
            seed = secrets.randbits(31)
        plan = _method_plan(config, method, len(modules), base, seed, layers)
        absolute = not method.on_task_vectors and any(
            linear_coefficients(method, config.resolve(n, layer_position(n, layers)), len(modules)) is None for n in names
        )
        if absolute:  # evaluated on θ₀ + φᵢ: a tensor no module touches may change too (e.g. Σw ≠ 1)
            if base is None:
                raise ModuleError(f"merging modules with {method.name} (as configured) needs the base checkpoint (base_model / --base)")
            names = float_names(base)
            shapes = {n: tuple(base.tensors[n].shape) for n in names}
        provenance = {
            "made_by": "posthoc merge", "method": method.name, "paper": method.paper, "config": config.to_dict(),
            "seed": seed, "rank": rank,
        }
        written = write_combined(
            out_dir, modules, base_ref, base, names, shapes, plan, rank, provenance, None,
            warnings=warnings, started=started, force=force, progress=progress, shard_size=shard_size,
        )
        return ModuleMergeResult.of(written, seed)
    finally:
        for m in modules:
            if m is not None:
                m.close()
        if base is not None:
            base.close()


