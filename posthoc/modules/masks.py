"""Mask modules: binary masks over a base model's weights or FFN neurons, saved, read back and applied.

Learned subnetworks (`posthoc split mask`) and neuron clusters (`posthoc split cluster`) are both saved as
modules of kind "mask" (see posthoc/modules/format.py). The module stores boolean tensors; the manifest maps
each *base* tensor it acts on to the stored mask and the axis the mask runs along:

    "tensors": {
      "encoder.layer.0.attention.self.query.weight": {"mask": "encoder.layer.0.attention.self.query.weight",
                                                      "axis": null},        # one bit per weight
      "encoder.layer.2.output.dense.weight":       {"mask": "ffn.2.neurons", "axis": 1},  # W_down columns
      "encoder.layer.2.intermediate.dense.weight": {"mask": "ffn.2.neurons", "axis": 0},  # W_up rows
      "encoder.layer.2.intermediate.dense.bias":   {"mask": "ffn.2.neurons", "axis": 0}
    }

A 1 marks what the module is about (a weight the subnetwork keeps, a neuron of the cluster). Applying it
in mode "keep" zeroes every masked entry that is 0 (the subnetwork alone; only the cluster's neurons in
the layers it touches), in mode "remove" every entry that is 1 (the inverted subnetwork; the model with
the cluster ablated). Zeroing a neuron's W_up row and bias (and W_gate row) and its W_down column removes
it exactly: act(0) = 0 for GELU and for SiLU·up. The output is a plain checkpoint with the base's tensor
names, shapes and dtypes, so transformers loads it as it loads the base.

Three ways to apply one, all through `MaskedCheckpoint` (a lazy view: masks are applied tensor by tensor):
`apply_mask(base, module, out, mode=...)` writes the pruned checkpoint; `load_masked(module, mode=...)`
(what `posthoc.load(MASK_DIR, mode=...)` calls) returns the base model with the mask applied in memory;
`posthoc stack BASE OUT --module MASK [--mask-mode remove]` applies it after any additive modules,
θ = M ⊙ (θ₀ + Σ sᵢφᵢ) (the stack/load hooks are in posthoc/modules/apply.py and posthoc/runtime.py).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from posthoc.checkpoint import (
    Checkpoint,
    CheckpointView,
    CheckpointWriter,
    TensorSpec,
    check_output_location,
    copy_side_files,
    open_checkpoint,
    replace_directory,
)
from posthoc.errors import IncompatibleError
from posthoc.ffn import FFN
from posthoc.models import load_model
from posthoc.modules.format import (
    BaseRef,
    Manifest,
    ModuleError,
    check_base,
    fingerprint,
    is_module,
    read_manifest,
    write_module,
)
from posthoc.progress import progress_bar

MODES = ("keep", "remove")


def neuron_mask_name(ffn_index: int) -> str:
    """The stored name of FFN `ffn_index`'s neuron mask (d_ff,) inside a module."""
    return f"ffn.{ffn_index}.neurons"


def checkpoint_name(base: Checkpoint, name: str) -> str:
    """The checkpoint's name for a model parameter (they can differ by the base model prefix, e.g. "bert.")."""
    if name in base.tensors:
        return name
    hits = [n for n in base.tensors if n.endswith("." + name) or name.endswith("." + n)]
    if len(hits) != 1:
        raise IncompatibleError(f"{base.source}: no tensor (or several) for model parameter {name!r}")
    return hits[0]


def neuron_entries(ffn: FFN, base: Checkpoint) -> dict[str, dict[str, Any]]:
    """Manifest entries that apply FFN neuron mask `ffn.<i>.neurons` to every tensor holding those neurons:
    W_up (and W_gate) rows and biases, W_down columns."""
    stored = neuron_mask_name(ffn.index)
    entries: dict[str, dict[str, Any]] = {}
    for module, axis in ((ffn.up, 0), (ffn.gate, 0), (ffn.down, 1)):
        if module is None:
            continue
        for suffix in ("weight", "bias") if axis == 0 else ("weight",):  # W_down's bias is not per neuron
            try:
                name = checkpoint_name(base, f"{module}.{suffix}")
            except IncompatibleError:
                if suffix == "bias":
                    continue
                raise
            entries[name] = {"mask": stored, "axis": axis}
    return entries


def write_mask_module(
    out_dir: str | os.PathLike[str],
    base: Checkpoint,
    masks: dict[str, torch.Tensor],
    entries: dict[str, dict[str, Any]],
    *,
    tags: dict[str, str] | None = None,
    provenance: dict[str, Any] | None = None,
    force: bool = False,
    extra_json: dict[str, Any] | None = None,
    base_ref: BaseRef | None = None,
) -> Path:
    """Write a mask module; every entry is checked against the base's shapes before anything is written.

    `base_ref` (BaseRef.of(base), computed once) saves re-fingerprinting the base for many modules."""
    masks = {name: m.to(torch.bool).contiguous() for name, m in masks.items()}
    for tensor, entry in entries.items():
        _check_entry(tensor, entry, masks, base, where=str(out_dir))
    unused = sorted(set(masks) - {e["mask"] for e in entries.values()})
    if unused:
        raise ModuleError(f"{out_dir}: stored mask {unused[0]!r} is applied to no base tensor")
    manifest = Manifest(
        kind="mask",
        base=base_ref or BaseRef.of(base),
        tensors=entries,
        tags=dict(tags or {}),
        provenance=dict(provenance or {}),
    )
    return write_module(out_dir, manifest, masks, force=force, protect=[base.directory], extra_json=extra_json)


def _check_entry(
    tensor: str, entry: Any, masks: dict[str, torch.Tensor], base: Checkpoint, where: str
) -> torch.Tensor:
    if not isinstance(entry, dict) or not isinstance(entry.get("mask"), str) or entry.get("axis", None) not in (
        None,
        0,
        1,
    ):
        raise ModuleError(f"{where}: entry for {tensor!r} must be {{'mask': NAME, 'axis': null|0|1}}, got {entry!r}")
    info = base.tensors.get(tensor)
    if info is None:
        raise ModuleError(f"{where}: masks tensor {tensor!r}, which {base.source} does not have")
    mask = masks.get(entry["mask"])
    if mask is None:
        raise ModuleError(f"{where}: entry for {tensor!r} names mask {entry['mask']!r}, which is not stored")
    axis = entry.get("axis")
    expected = tuple(info.shape) if axis is None else (info.shape[axis],) if axis < len(info.shape) else None
    if expected is None or tuple(mask.shape) != expected:
        raise ModuleError(
            f"{where}: mask {entry['mask']!r} has shape {list(mask.shape)} but {tensor!r} "
            f"{list(info.shape)} needs {list(expected) if expected else '?'} along axis {axis}"
        )
    return mask


def read_mask_module(module: str | os.PathLike[str]) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """The manifest and the stored boolean masks of a mask module."""
    manifest = read_manifest(module)
    if manifest.kind != "mask":
        raise ModuleError(f"{module}: a module of kind {manifest.kind!r}, not 'mask'")
    with open_checkpoint(module) as ckpt:
        masks = {name: ckpt.read(name).to(torch.bool) for name in ckpt}
    return manifest, masks


def apply_to_tensor(tensor: torch.Tensor, mask: torch.Tensor, axis: int | None, mode: str = "keep") -> torch.Tensor:
    """Zero the entries of `tensor` that `mask` (along `axis`, or elementwise) says go. A pure function."""
    if mode not in MODES:
        raise ModuleError(f"mask mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    keep = mask if mode == "keep" else ~mask
    if axis is not None:
        shape = [1] * tensor.dim()
        shape[axis] = -1
        keep = keep.reshape(shape)
    return torch.where(keep, tensor, torch.zeros((), dtype=tensor.dtype))


class MaskedCheckpoint(CheckpointView):
    """A checkpoint (or any Checkpoint view, e.g. a base with additive modules applied) read through mask
    modules: `read(name, rows)` zeroes what each mask says goes ("keep": its 0s; "remove": its 1s).

    Masks are multiplicative, so they come after any additive change: θ = M ⊙ (θ₀ + Σ sᵢφᵢ). Every module
    is checked against the base (fingerprint, tensor names, mask shapes) when the view is made.
    """

    def __init__(self, base: Checkpoint, masks: list[tuple[Manifest, dict[str, torch.Tensor], str, str]],
                 warnings: list[str]):
        super().__init__(base, base.source + "".join(f"*{where}({mode})" for _, _, mode, where in masks), warnings)
        self.masks = masks  # (manifest, stored masks, mode, module path)

    def __repr__(self) -> str:
        return f"MaskedCheckpoint({self.source!r})"

    def touched(self, name: str) -> bool:
        return any(name in manifest.tensors for manifest, _, _, _ in self.masks) or bool(
            getattr(self.base, "touched", lambda n: False)(name))

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        value = self.base.read(name, rows)
        for manifest, masks, mode, _ in self.masks:
            entry = manifest.tensors.get(name)
            if entry is None:
                continue
            mask, axis = masks[entry["mask"]], entry.get("axis")
            if rows is not None and axis in (None, 0):
                mask = mask[rows]
            value = apply_to_tensor(value, mask, axis, mode)
        return value

def is_mask_module(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a posthoc module of kind "mask" (cheap: reads module.json only)."""
    try:
        return is_module(path) and Path(path).is_dir() and read_manifest(path).kind == "mask"
    except ModuleError:
        return False


def open_masked(
    base: str | os.PathLike[str] | Checkpoint,
    modules: Sequence[str | os.PathLike[str]],
    modes: str | Sequence[str] = "keep",
    *,
    allow_base_mismatch: bool = False,
) -> MaskedCheckpoint:
    """`base` read through mask modules (one mode for all, or one per module); checked before any read.

    A Checkpoint passed as `base` is closed with the view."""
    modes = [modes] * len(modules) if isinstance(modes, str) else list(modes)
    if len(modes) != len(modules):
        raise ModuleError(f"give one mask mode per mask module ({len(modules)}), got {len(modes)}")
    for mode in modes:
        if mode not in MODES:
            raise ModuleError(f"mask mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    opened = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    try:
        actual = fingerprint(getattr(opened, "base", opened))  # a view's fingerprint is its base's
        loaded, warnings = [], []
        for module, mode in zip(modules, modes):
            manifest, masks = read_mask_module(module)
            warnings += check_base(manifest, opened, str(module), allow_mismatch=allow_base_mismatch, actual=actual)
            for tensor, entry in manifest.tensors.items():
                _check_entry(tensor, entry, masks, opened, where=str(module))
            loaded.append((manifest, masks, mode, str(module)))
    except BaseException:
        opened.close()
        raise
    return MaskedCheckpoint(opened, loaded, warnings)


def apply_mask(
    model: str | os.PathLike[str],
    module: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    mode: str = "keep",
    force: bool = False,
    allow_base_mismatch: bool = False,
    progress: bool = True,
) -> Path:
    """Write `model` with a mask module applied ("keep": the masked subnetwork; "remove": its complement).

    Streams tensor by tensor through the checkpoint layer; config and tokenizer files are copied from the
    model, so the output loads with transformers exactly as the base does. (`posthoc stack BASE OUT
    --module MASK` does the same, after any additive modules.)
    """
    if mode not in MODES:
        raise ModuleError(f"mask mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    with open_masked(model, [module], mode, allow_base_mismatch=allow_base_mismatch) as view:
        specs = [TensorSpec(name, info.shape, info.dtype) for name, info in view.tensors.items()]
        with (
            CheckpointWriter(out_dir, specs, force=force, protect=[view.directory, Path(module)]) as writer,
            progress_bar(len(specs), f"apply mask ({mode})", "tensor", enabled=progress) as bar,
        ):
            for spec in specs:
                writer.write(spec.name, view.read(spec.name))
                bar.update(1)
            copy_side_files(view.directory, writer, config_from=view.directory)
            writer.add_json(
                "posthoc_mask.json",
                {"module": str(module), "mode": mode, "base": view.base.source, "tags": view.masks[0][0].tags},
            )
            return writer.commit()


def load_masked(
    module: str | os.PathLike[str],
    *,
    mode: str = "keep",
    base: str | os.PathLike[str] | None = None,
    dtype: Any = None,
    allow_base_mismatch: bool = False,
    return_tokenizer: bool = False,
) -> Any:
    """The base model (transformers, eval mode) with a mask module applied in memory: `posthoc.load(MASK)`.

    base: the checkpoint the mask was made for (default: the one its manifest names, when it is here)."""
    if mode not in MODES:
        raise ModuleError(f"mask mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    manifest = read_manifest(module)
    if manifest.kind != "mask":
        raise ModuleError(f"{module}: a module of kind {manifest.kind!r}, not 'mask'")
    if base is None:
        base = manifest.base.source
        if not base or not Path(base).exists():
            raise ModuleError(f"{module}: give base= (the model it masks); its manifest names {base or 'none'!r}, "
                              "which is not here")
    with open_masked(base, [module], mode, allow_base_mismatch=allow_base_mismatch) as view:
        model, tokenizer, _ = load_model(view.directory, dtype=dtype or torch.float32)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in manifest.tensors:
                hits = [p for p in params if p == name or p.endswith("." + name) or name.endswith("." + p)]
                if len(hits) != 1:
                    raise ModuleError(f"{module}: {name!r} matches no parameter (or several) of the loaded model")
                target = params[hits[0]]
                target.copy_(view.read(name).to(target.dtype))
    model.eval()
    return (model, tokenizer) if return_tokenizer else model


@contextmanager
def staged_output(out_dir: str | os.PathLike[str], *, protect: Iterable[Path] = (), force: bool = False) -> Iterator[Path]:
    """A temporary directory next to `out_dir`, renamed to it when the block succeeds (removed if it fails).

    For analysis outputs that are a directory of files and modules rather than one checkpoint."""
    target = check_output_location(Path(out_dir), protect, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.posthoc-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_directory(staging, target)
