"""Portable modules: the module format, extraction from fine-tunes, composition (stacking) and merging.

    from posthoc.modules import extract, stack, open_module

    extract(base, tuned, "modules/task-a", kind="lora", rank=16, calib="calib.txt")
    stack(base, ["modules/task-a", "modules/lang-x"], "stacked", scales=[1.0, 1.0])
    with open_module("modules/task-a") as m:     # ours, or a PEFT adapter made elsewhere
        phi = m.delta("encoder.layer.0.attention.self.query.weight")

Merging modules goes through `posthoc.merge.merge_checkpoints` (and `posthoc merge`), which hands
all-module configs to `posthoc.merge.modules.merge_modules`; inside the library, import from the module that
defines a name (`posthoc.modules.apply`, …), not from this package.
"""

from posthoc.modules.apply import stack
from posthoc.modules.extraction import extract
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
from posthoc.modules.module import open_module

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
