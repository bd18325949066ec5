"""`posthoc extract BASE TUNED OUT --kind delta|sparse|lora`: a fine-tune as a module of its base.

    delta   the task vector φ = θ_tuned − θ_base, every changed tensor dense
    sparse  the K entries of largest |φ| (LT-SFT's selection), K = density × (entries of the model, or of
            each tensor with `per_tensor`); exact top-k by `posthoc.sparsify.TopK` (no sort, ties by
            position); stored as indices + values
    lora    per changed Linear/Embedding weight, truncated SVD of φ to `rank`, or to the smallest rank that
            keeps `energy` of ‖φ‖² (capped by `max_rank`); B = U√S, A = √S Vᵀ. Other changed tensors (norms,
            biases, matrices too small to factor, `full` patterns) are kept whole. The directory is a PEFT
            adapter as well.

Inputs are read tensor by tensor (never a whole state dict); a global sparse selection reads the model
four times (count, two top-k passes, write) instead of holding it. Every extraction writes fidelity.json
and report.html into the module: per-tensor relative error and energy kept and, with calibration texts,
the agreement of base + module with the fine-tune.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from posthoc import sparsify
from posthoc.checkpoint import DEFAULT_SHARD_SIZE, Checkpoint, check_output_location, open_checkpoint
from posthoc.errors import ConfigError, IncompatibleError
from posthoc.modules import lowrank
from posthoc.modules.apply import stack
from posthoc.modules.build import ModuleBuilder
from posthoc.modules.fidelity import (
    TensorFidelity,
    calibration_agreement,
    overall_error,
    read_texts,
    write_report,
)
from posthoc.modules.format import BaseRef
from posthoc.modules.peft_format import BaseLayout
from posthoc.progress import progress_bar

EXTRACT_KINDS = ("delta", "sparse", "lora")


@dataclass(frozen=True)
class ExtractSettings:
    """What to extract; validated in one table (`check`), before anything is read."""

    kind: str
    density: float | None = None
    per_tensor: bool = False
    rank: int | None = None
    energy: float | None = None
    max_rank: int | None = None
    full: tuple[str, ...] = ()  # substrings of tensor names kept whole in a lora module

    # parameter: (kinds it belongs to, what it must be, test)
    RULES: ClassVar[dict[str, tuple[tuple[str, ...], str, Any]]] = {
        "density": (("sparse",), "a number in (0, 1]", lambda v: _number(v) and 0 < v <= 1),
        "rank": (("lora",), "an int >= 1", lambda v: _integer(v) and v >= 1),
        "energy": (("lora",), "a number in (0, 1]", lambda v: _number(v) and 0 < v <= 1),
        "max_rank": (("lora",), "an int >= 1", lambda v: _integer(v) and v >= 1),
    }

    def check(self) -> None:
        if self.kind not in EXTRACT_KINDS:
            raise ConfigError(f"The 'kind' parameter of extract must be one of {', '.join(EXTRACT_KINDS)}. Got {self.kind!r} instead.")
        for name, (kinds, what, ok) in self.RULES.items():
            value = getattr(self, name)
            if value is None:
                continue
            if self.kind not in kinds:
                raise ConfigError(f"The '{name}' parameter of extract applies to --kind {'/'.join(kinds)}, not {self.kind}.")
            if not ok(value):
                raise ConfigError(f"The '{name}' parameter of extract must be {what}. Got {value!r} instead.")
        if self.kind == "sparse" and self.density is None:
            raise ConfigError("--kind sparse needs --density (the fraction of entries kept, in (0, 1])")
        if self.per_tensor and self.kind != "sparse":
            raise ConfigError("--per-tensor applies to --kind sparse")
        if self.kind == "lora" and (self.rank is None) == (self.energy is None):
            raise ConfigError("--kind lora needs exactly one of --rank R or --energy E")
        if self.max_rank is not None and self.energy is None:
            raise ConfigError("--max-rank caps the rank chosen by --energy; with --rank it has no effect")
        if self.full and self.kind != "lora":
            raise ConfigError("--full applies to --kind lora")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in {"kind": self.kind, "density": self.density, "per_tensor": self.per_tensor or None,
                                  "rank": self.rank, "energy": self.energy, "max_rank": self.max_rank,
                                  "full": list(self.full) or None}.items() if v is not None}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ExtractResult:
    out_dir: Path
    settings: ExtractSettings
    tensors: list[TensorFidelity]
    unchanged: int  # base tensors the fine-tune left exactly as they were
    stored_bytes: int
    base_bytes: int
    seconds: float
    calibration: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def relative_error(self) -> float:
        return overall_error(self.tensors)

    @property
    def energy_kept(self) -> float:
        return max(0.0, 1.0 - self.relative_error**2)

    def summary(self) -> dict[str, Any]:
        ranks = [t.rank for t in self.tensors if t.rank is not None]
        out: dict[str, Any] = {
            "kind": self.settings.kind,
            "changed tensors": len(self.tensors),
            "unchanged tensors": self.unchanged,
            "relative error (whole model)": self.relative_error,
            "energy kept (whole model)": self.energy_kept,
            "worst tensor relative error": max((t.relative_error for t in self.tensors), default=0.0),
            "module size (MB)": self.stored_bytes / 1e6,
            "base size (MB)": self.base_bytes / 1e6,
        }
        if ranks:
            out["LoRA tensors"] = len(ranks)
            out["rank min / median / max"] = f"{min(ranks)} / {sorted(ranks)[len(ranks) // 2]} / {max(ranks)}"
        kept = [t.nnz for t in self.tensors if t.nnz is not None]
        if kept:
            out["kept entries"] = sum(kept)
        return out

    def lines(self, worst: int = 5) -> list[str]:
        """What the CLI prints: the summary, the worst tensors and the calibration agreement."""
        lines = [f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in self.summary().items()]
        for t in sorted(self.tensors, key=lambda t: -t.relative_error)[:worst]:
            if t.relative_error > 0:
                detail = f"rank {t.rank}" if t.rank is not None else f"{t.nnz} entries" if t.nnz is not None else t.storage
                lines.append(f"  {t.name}: rel. error {t.relative_error:.4f}, energy kept {t.energy_kept:.4f} ({detail})")
        if self.calibration is not None:
            c = self.calibration
            agreement = f", label agreement {c['label_agreement']:.4f} ({c['label_source']})" if c["label_agreement"] is not None else ""
            lines.append(
                f"calibration ({c['texts']} texts): hidden-state cosine {c['hidden_cosine_mean']:.5f} "
                f"(min {c['hidden_cosine_min']:.4f}), pooled cosine {c['pooled_cosine_mean']:.5f}{agreement}"
            )
        return lines


def _check_pair(base: Checkpoint, tuned: Checkpoint) -> None:
    """Same tensors, shapes and floatness: a module is a change of the base's own tensors."""
    extra = [n for n in tuned.tensors if n not in base.tensors]
    if extra:
        raise IncompatibleError(
            f"tensor {extra[0]} of {tuned.source} is not in the base {base.source}; a module can only change the "
            "base's own tensors (was the fine-tune made from another base, or with a new head inside it?)"
        )
    missing = [n for n in base.tensors if n not in tuned.tensors]
    if missing:
        raise IncompatibleError(f"tensor {missing[0]} of the base is missing in {tuned.source}")
    for name, info in base.tensors.items():
        other = tuned.tensors[name]
        if other.shape != info.shape:
            raise IncompatibleError(f"tensor {name}: shape {list(info.shape)} in the base but {list(other.shape)} in {tuned.source}")
        if info.dtype.is_floating_point != other.dtype.is_floating_point:
            raise IncompatibleError(f"tensor {name}: {info.dtype} in the base but {other.dtype} in {tuned.source}")


def _changes(base: Checkpoint, tuned: Checkpoint, names: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, φ in float32) for every floating tensor, one at a time; integer tensors must not change."""
    for name in names:
        b, t = base.read(name), tuned.read(name)
        if not b.dtype.is_floating_point:
            if not torch.equal(b, t):
                raise IncompatibleError(
                    f"tensor {name}: integer tensor (a buffer such as position ids) differs in {tuned.source}; "
                    "a module holds changes of float weights only"
                )
            continue
        compute = torch.float64 if torch.float64 in (b.dtype, t.dtype) else torch.float32
        yield name, (t.to(compute) - b.to(compute)).to(torch.float32)


def _norm(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x.reshape(-1), dtype=torch.float64))


def extract(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    kind: str = "delta",
    density: float | None = None,
    per_tensor: bool = False,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    full: Sequence[str] = (),
    calib: str | os.PathLike[str] | Sequence[str] | None = None,
    calib_limit: int = 256,
    max_length: int = 128,
    tags: dict[str, str] | None = None,
    force: bool = False,
    progress: bool = True,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> ExtractResult:
    """Extract the change from `base` to `tuned` as a module in `out_dir` (see the module docstring).

    `calib` is a text file (one text per line) or a list of texts. Everything that can be checked is checked
    before any tensor is read; the module appears only when complete, with its fidelity report.
    """
    started = time.perf_counter()
    settings = ExtractSettings(kind, density, per_tensor, rank, energy, max_rank, tuple(full))
    settings.check()
    texts = None
    if calib is not None:
        texts = list(calib)[:calib_limit] if not isinstance(calib, (str, os.PathLike)) else read_texts(calib, calib_limit)
    with open_checkpoint(base) as b, open_checkpoint(tuned) as t:
        inputs = [b.directory, t.directory]
        check_output_location(Path(out_dir), inputs, force)
        _check_pair(b, t)
        layout = BaseLayout.of(b) if kind == "lora" else None
        if kind == "lora":
            _check_rank(b, layout, settings)
        builder = ModuleBuilder(out_dir, kind, BaseRef.of(b), force=force, protect=inputs, shard_size=shard_size)
        with builder.writer:
            names = list(b.tensors)
            if kind == "sparse" and not per_tensor:
                records, unchanged = _sparse_global(b, t, names, builder, density, progress)
            else:
                records, unchanged = _per_tensor(b, t, names, builder, settings, layout, progress)
            if not records:
                raise IncompatibleError(f"{t.source} is identical to the base {b.source}: there is no change to extract")
            provenance = {"made_by": "posthoc extract", "base": b.source, "tuned": t.source, "settings": settings.to_dict()}
            builder.finish(base=b, layout=layout, tags=tags, provenance=provenance)
            staging = builder.writer.finalize()
            result = ExtractResult(
                out_dir=builder.out_dir, settings=settings, tensors=records, unchanged=unchanged,
                stored_bytes=builder.writer.total_size, base_bytes=sum(i.nbytes for i in b.tensors.values()),
                seconds=0.0, warnings=builder.warnings,
            )
            if texts is not None:
                result.calibration = _calibrate(b, t, staging, texts, max_length)
            result.seconds = time.perf_counter() - started
            fidelity = {"summary": result.summary(), "calibration": result.calibration,
                        "tensors": [r.to_dict() for r in records], "seconds": round(result.seconds, 2)}
            builder.writer.add_json("fidelity.json", fidelity)
            write_report(
                staging, title=f"{kind} module of {Path(t.source).name}", subtitle=f"base {b.source}; {settings.to_dict()}",
                summary=result.summary(), records=records, calibration=result.calibration,
            )
            builder.commit()
    return result


def _check_rank(base: Checkpoint, layout: BaseLayout, settings: ExtractSettings) -> None:
    candidates = [
        (n, tuple(i.shape)) for n, i in base.tensors.items()
        if layout.lora_layout(n, tuple(i.shape)) and not any(p in n for p in settings.full)
    ]
    if not candidates:
        raise ConfigError(f"{base.source}: no Linear or Embedding weight to factor; use --kind delta or sparse")
    if settings.rank is not None:
        name, shape = max(candidates, key=lambda c: min(c[1]))
        if settings.rank > min(shape):
            raise ConfigError(
                f"The 'rank' parameter of extract must be at most {min(shape)}: the largest matrix of {base.source} "
                f"that takes a LoRA ({name}, {shape[0]}×{shape[1]}) has rank at most {min(shape)}. Got {settings.rank} instead."
            )


def _per_tensor(
    base: Checkpoint, tuned: Checkpoint, names: list[str], builder: ModuleBuilder, settings: ExtractSettings,
    layout: BaseLayout | None, progress: bool,
) -> tuple[list[TensorFidelity], int]:
    records: list[TensorFidelity] = []
    unchanged = 0
    with progress_bar(len(names), f"extract {settings.kind}", "tensor", enabled=progress) as bar:
        bar.leave = False  # a step: the summary printed at the end is what stays
        for name, phi in _changes(base, tuned, names):
            bar.update(1)
            if not bool(phi.any()):
                unchanged += 1
                continue
            shape = list(phi.shape)
            norm = _norm(phi)
            if settings.kind == "sparse":
                flat = phi.reshape(-1)
                indices = _top_entries(flat, settings.density)
                values = flat[indices]
                builder.sparse(name, tuple(shape), indices, values)
                error = math.sqrt(max(norm**2 - _norm(values) ** 2, 0.0)) / norm
                records.append(TensorFidelity(name, shape, "sparse", norm, error, nnz=int(indices.numel())))
                continue
            which = layout.lora_layout(name, tuple(shape)) if settings.kind == "lora" else None
            if which is not None and not any(p in name for p in settings.full):
                r = settings.rank if settings.rank is not None else lowrank.rank_for_energy(phi, settings.energy, settings.max_rank)
                r = min(r, *shape)
                if lowrank.lora_is_smaller(tuple(shape), r):
                    B, A, error = lowrank.factor(phi, r)
                    builder.lora(name, B, A, which)
                    records.append(TensorFidelity(name, shape, "lora", norm, error, rank=r))
                    continue
            builder.dense(name, phi)
            records.append(TensorFidelity(name, shape, "dense", norm, 0.0))
    return records, unchanged


def _top_entries(flat: torch.Tensor, density: float) -> torch.Tensor:
    """Ascending positions of the max(1, ⌊density·n⌋) largest |φ| of one tensor (its nonzero ones only)."""
    n = flat.numel()
    nonzero = int(torch.count_nonzero(flat))
    k = max(1, int(density * n))
    if k >= nonzero:
        return torch.nonzero(flat).squeeze(1)
    top = sparsify.TopK(k, n)
    whole = slice(0, n)
    sparsify.fit_top_k(sparsify.Deltas(lambda: iter([(whole, flat)])), [top])
    return torch.nonzero(top.keep(whole, flat)).squeeze(1)


def _sparse_global(
    base: Checkpoint, tuned: Checkpoint, names: list[str], builder: ModuleBuilder, density: float, progress: bool
) -> tuple[list[TensorFidelity], int]:
    """LT-SFT's selection: the K largest |φ| over the whole model, K = max(1, ⌊density × entries⌋).

    Pass 1 counts the changed entries; passes 2–3 fit the exact threshold (`sparsify.fit_top_k` over the
    changed tensors seen as one flat vector); pass 4 writes what each tensor keeps.
    """
    total_entries = 0
    changed: list[tuple[str, int, int]] = []  # name, offset in the flat vector of changed tensors, numel
    nonzero = 0
    offset = 0
    with progress_bar(len(names), "extract sparse: count", "tensor", enabled=progress) as bar:
        bar.leave = False  # a step: the summary printed at the end is what stays
        for name, phi in _changes(base, tuned, names):
            bar.update(1)
            total_entries += phi.numel()
            count = int(torch.count_nonzero(phi))
            if count:
                changed.append((name, offset, phi.numel()))
                offset += phi.numel()
                nonzero += count
    unchanged = len([n for n in names if base.tensors[n].dtype.is_floating_point]) - len(changed)
    k = max(1, int(density * total_entries))
    keep_all = k >= nonzero
    top = sparsify.TopK(k, offset)

    def chunks() -> Iterator[tuple[slice, torch.Tensor]]:
        for (_name, start, numel), (_, phi) in zip(changed, _changes(base, tuned, [c[0] for c in changed])):
            yield slice(start, start + numel), phi.reshape(-1)

    if not keep_all:
        sparsify.fit_top_k(sparsify.Deltas(chunks), [top])
    records: list[TensorFidelity] = []
    with progress_bar(len(changed), "extract sparse: write", "tensor", enabled=progress) as bar:
        bar.leave = False  # a step: the summary printed at the end is what stays
        for s, flat in chunks():
            name = changed[len(records)][0]
            kept = flat if keep_all else top.keep(s, flat)
            indices = torch.nonzero(kept).squeeze(1)
            values = flat[indices]
            norm = _norm(flat)
            error = math.sqrt(max(norm**2 - _norm(values) ** 2, 0.0)) / norm
            builder.sparse(name, tuple(base.tensors[name].shape), indices, values)
            records.append(TensorFidelity(name, list(base.tensors[name].shape), "sparse", norm, error, nnz=int(indices.numel())))
            bar.update(1)
    return records, unchanged


def _calibrate(base: Checkpoint, tuned: Checkpoint, staging: Path, texts: list[str], max_length: int) -> dict[str, Any]:
    """Stack the staged module onto the base in a temporary directory and compare it with the fine-tune."""
    with tempfile.TemporaryDirectory(prefix="posthoc-calib-") as tmp:
        applied = stack(base.source, [staging], Path(tmp) / "applied", progress=False)
        return calibration_agreement(tuned.directory, applied.out_dir, texts, max_length=max_length,
                                     tokenizer_dir=base.directory)
