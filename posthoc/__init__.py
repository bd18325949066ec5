"""posthoc: post-hoc modular deep learning (merge, split, extract, stack).

Importing the package is light (no torch): heavy modules are imported by the functions that need them.
"""

from __future__ import annotations

from typing import Any

from posthoc.provenance import __version__


def load(path: Any, **kwargs: Any) -> Any:
    """Load a posthoc output ready to run; see `posthoc.runtime.load` (MoE-fication: `top_k=`, `router=`)."""
    from posthoc.runtime import load as _load

    return _load(path, **kwargs)


__all__ = ["__version__", "load"]
