"""Portable modules: the module format, extraction from fine-tunes, composition (stacking) and merging."""

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
    "fingerprint",
    "is_module",
    "read_manifest",
    "write_module",
]
