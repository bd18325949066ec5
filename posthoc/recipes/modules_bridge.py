"""The `extract` and `stack` steps call posthoc.modules (extract, stack); this is the one place they meet."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def extract_module(base: Path, model: Path, out: Path, *, kind: str, density: float | None, rank: int | None) -> dict[str, Any]:
    from posthoc.modules.extraction import extract

    options: dict[str, Any] = {}
    if kind == "sparse":
        options["density"] = 1.0 if density is None else density  # 1.0: every changed entry (exact for LT-SFT)
    if rank is not None:
        options["rank"] = rank
    result = extract(base, model, out, kind=kind, force=True, progress=False, **options)
    summary = result.summary() if callable(getattr(result, "summary", None)) else {}
    return {"kind": kind, "stored_bytes": getattr(result, "stored_bytes", None), "summary": summary}


def stack_modules(base: Path, modules: list[Path], out: Path, *, allow_base_mismatch: bool) -> dict[str, Any]:
    from posthoc.modules.apply import stack

    result = stack(base, [str(m) for m in modules], out, allow_base_mismatch=allow_base_mismatch, force=True,
                   progress=False)  # fmt: skip
    return {"modules": [str(m) for m in modules], "changed_tensors": result.num_tensors, "warnings": result.warnings}
