"""Portable modules: the module format, extraction from fine-tunes, composition (stacking) and merging.

    from posthoc.modules import extract, stack, open_module

    extract(base, tuned, "modules/task-a", kind="lora", rank=16, calib="calib.txt")
    stack(base, ["modules/task-a", "modules/lang-x"], "stacked", scales=[1.0, 1.0])
    with open_module("modules/task-a") as m:     # ours, or a PEFT adapter made elsewhere
        phi = m.delta("encoder.layer.0.attention.self.query.weight")

Merging modules goes through `posthoc.merge.merge_checkpoints` (and `posthoc merge`), which hands
all-module configs to `posthoc.modules.merging.merge_modules`.
"""

from posthoc.modules.format import (
    KINDS,
    BaseRef,
    Manifest,
    ModuleError,
    check_base,
    fingerprint,
    is_module,
    read_manifest,
    write_module,
)

__all__ = [
    "KINDS",
    "BaseRef",
    "Manifest",
    "ModuleError",
    "check_base",
    "extract",
    "fingerprint",
    "is_module",
    "open_module",
    "read_manifest",
    "stack",
    "write_module",
]


_LAZY = {"extract": "posthoc.modules.extraction", "stack": "posthoc.modules.apply", "open_module": "posthoc.modules.module"}


def __getattr__(name: str):
    # The heavier entry points are imported on first use, so `posthoc.modules.format` stays cheap to import
    # (the merge engine and the analysers import it) and no import cycle with posthoc.merge can form.
    if name not in _LAZY:
        raise AttributeError(f"module 'posthoc.modules' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
