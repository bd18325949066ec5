"""What a merge returns, and the per-tensor seed of randomized methods (shared by checkpoint and module merges)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from posthoc.compat import CompatReport


@dataclass
class MergeResult:
    out_dir: Path
    seconds: float
    num_tensors: int
    total_bytes: int
    num_shards: int
    seed: int | None
    report: CompatReport
    warnings: list[str] = field(default_factory=list)


def tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
