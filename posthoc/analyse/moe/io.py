"""The files of an MoE-fication output, written atomically and read back.

    OUT_DIR/
      config.json, model.safetensors (or shards + index), tokenizer files
                          the input checkpoint, every tensor kept, with each FFN's neurons permuted into
                          expert-contiguous order (rows of W_up/W_gate and their biases, columns of
                          W_down): transformers loads it as the same dense model, same function
      experts.safetensors per FFN i: `i.order` (new position j holds input neuron order[j]), `i.sizes`,
                          `i.router.<kind>.<param>` (centroid, mlp, gate: its neuron weights),
                          `i.compensation`, `i.heal.<param>`
      experts.json        structure: format version, parameters, FFN module paths, per-layer sizes,
                          shared neurons, top_k, thresholds, router recall; calibration and timings
      module.json         a posthoc module of kind "experts" (posthoc/modules/format.py): its base is the
                          permuted checkpoint beside it (fingerprint), provenance names the input
      report.html + PNGs

Why not `write_module` alone: the output must also *be* a loadable dense checkpoint, so the weights go
through `CheckpointWriter` (streamed, one tensor at a time, atomic), and the module's own tensors and
manifest are added to the same staging directory before the single rename.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from posthoc.analyse.moe.layers import MLPRouter, make_router
from posthoc.checkpoint import Checkpoint, CheckpointWriter, TensorSpec, copy_side_files, open_checkpoint
from posthoc.ffn import FFN
from posthoc.modules.format import MODULE_FILE, BaseRef, Manifest, ModuleError, fingerprint, read_manifest
from posthoc.provenance import __version__

FORMAT = "posthoc-experts"
EXPERTS_FORMAT_VERSION = 1


def _tensor_name(ckpt: Checkpoint, name: str) -> str | None:
    """The checkpoint's name for a model parameter (they can differ by the base model prefix)."""
    if name in ckpt.tensors:
        return name
    hits = [n for n in ckpt.tensors if n.endswith("." + name) or name.endswith("." + n)]
    return hits[0] if len(hits) == 1 else None


def _permutations(moe: Any, ckpt: Checkpoint) -> dict[str, tuple[torch.Tensor, int]]:
    """Checkpoint tensor name -> (neuron order, axis) for every FFN tensor that carries neurons."""
    plan: dict[str, tuple[torch.Tensor, int]] = {}
    for ffn, order in zip(moe.ffns_, moe.orders_):
        for path, axis, suffixes in ((ffn.up, 0, ("weight", "bias")), (ffn.gate, 0, ("weight", "bias")),
                                     (ffn.down, 1, ("weight",))):
            if path is None:
                continue
            for suffix in suffixes:
                name = _tensor_name(ckpt, f"{path}.{suffix}")
                if name is None:
                    if suffix == "bias":
                        continue
                    raise ModuleError(f"{ckpt.source}: no tensor for {path}.{suffix}; cannot write the permuted checkpoint")
                shape = ckpt.tensors[name].shape
                if shape[axis] != len(order):
                    raise ModuleError(f"{ckpt.source}: tensor {name} has {shape[axis]} neurons on axis {axis}, "
                                      f"the FFN has {len(order)}")
                plan[name] = (order, axis)
    return plan


def experts_tensors(moe: Any) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for i in range(len(moe.orders_)):
        tensors[f"{i}.order"] = moe.orders_[i].long().contiguous()
        tensors[f"{i}.sizes"] = torch.tensor(moe.sizes_[i], dtype=torch.long)
        for kind, router in moe.routers_[i].items():
            for key, value in router.state_dict().items():
                tensors[f"{i}.router.{kind}.{key}"] = value.detach().float().contiguous()
        if moe.compensation_ is not None:
            tensors[f"{i}.compensation"] = moe.compensation_[i].float().contiguous()
        for key, value in (moe.heal_state_[i] if moe.heal_state_ else {}).items():
            tensors[f"{i}.heal.{key}"] = value.detach().float().contiguous()
    return tensors


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def structure(moe: Any) -> dict[str, Any]:
    layers = []
    for i, ffn in enumerate(moe.ffns_):
        layers.append({
            "ffn": ffn.describe() if isinstance(ffn, FFN) else ffn,
            "sizes": list(moe.sizes_[i]),
            "shared": int(moe.shared_[i]),
            "top_k": int(moe.top_k_[i]),
            "threshold": moe.thresholds_[i],
            "routers": {kind: _router_shape(r) for kind, r in moe.routers_[i].items()},
            "recall": moe.recall_[i] if getattr(moe, "recall_", None) else {},
        })
    params = {k: v for k, v in moe.get_params().items() if k not in ("progress", "threads")}
    return {
        "format": FORMAT,
        "experts_format_version": EXPERTS_FORMAT_VERSION,
        "posthoc_version": __version__,
        "params": _jsonable(params),
        "layers": layers,
        "tokens": getattr(moe, "tokens_", None),
        "calibration": getattr(moe, "calibration_", None),
        "timings": _jsonable(getattr(moe, "timings_", {})),
        "model_type": getattr(moe, "model_type_", None),
        "healing": _jsonable(getattr(moe, "heal_log_", None)),
    }


def _router_shape(router: torch.nn.Module) -> dict[str, Any]:
    if isinstance(router, MLPRouter):
        return {"class": "MLPRouter", "hidden": router.first.out_features}
    return {"class": type(router).__name__}


def write_output(moe: Any, base: Path, out_dir: Path, *, force: bool, report: Any, extra: dict[str, Any]) -> Path:
    with open_checkpoint(base) as ckpt:
        plan = _permutations(moe, ckpt)
        protect = [ckpt.directory] + ([Path(ckpt.source)] if Path(ckpt.source).exists() else [])
        specs = [TensorSpec(n, info.shape, info.dtype) for n, info in ckpt.tensors.items()]
        input_print = fingerprint(ckpt)
        with CheckpointWriter(out_dir, specs, force=force, protect=protect) as writer:
            for name in ckpt.tensors:
                tensor = ckpt.read(name)
                if name in plan:
                    order, axis = plan[name]
                    tensor = tensor.index_select(axis, order).contiguous()
                writer.write(name, tensor)
            copy_side_files(ckpt.directory, writer, config_from=ckpt.directory)
            save_file(experts_tensors(moe), str(writer.staging / "experts.safetensors"), metadata={"format": "pt"})
            info = structure(moe)
            info.update(_jsonable(extra))
            writer.add_json("experts.json", info)
            permuted = Checkpoint(writer.staging, [writer.staging / f for f in sorted(set(writer.weight_map.values()))],
                                  str(out_dir))
            permuted.config = ckpt.config
            base_ref = BaseRef(ckpt.architecture, fingerprint(permuted), str(out_dir), ckpt.config.get("model_type"))
            permuted.close()
            manifest = Manifest(
                kind="experts",
                base=base_ref,
                tensors={name: {"neurons": len(order), "axis": axis} for name, (order, axis) in plan.items()},
                tags={"experts": str(moe.experts), "top_k": str(moe.top_k), "partition": moe.partition,
                      "router": moe.router},
                provenance={"input": ckpt.source, "input_fingerprint": input_print, "calibration": info["calibration"],
                            "tokens": info["tokens"], "note": "the base is the permuted checkpoint in this directory"},
            )
            writer.add_json(MODULE_FILE, manifest.to_json())
            if report is not None:
                report.write(writer.staging)
            return writer.commit()


def read_structure(directory: Path) -> tuple[Manifest, dict[str, Any]]:
    """module.json and experts.json of an output, checked: kind, format and version."""
    if not directory.is_dir():
        raise ModuleError(f"{directory}: no such directory")
    if not (directory / MODULE_FILE).is_file():
        raise ModuleError(
            f"{directory}: no {MODULE_FILE}: not the output of `posthoc split moe` (posthoc.load reads those; "
            "load a plain checkpoint with transformers)"
        )
    manifest = read_manifest(directory)
    if manifest.kind != "experts":
        raise ModuleError(
            f"{directory}: a posthoc module of kind {manifest.kind!r}; an MoE-fication output has kind 'experts' "
            "(`posthoc split moe`); posthoc.load also runs 'mask' modules, apply others with `posthoc stack`"
        )
    path = directory / "experts.json"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModuleError(f"{path}: missing; the MoE output is incomplete (run `posthoc split moe` again)") from None
    except json.JSONDecodeError as error:
        raise ModuleError(f"{path}: not valid JSON ({error})") from None
    version = info.get("experts_format_version") if isinstance(info, dict) else None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ModuleError(f"{path}: field 'format' must be {FORMAT!r}")
    if version != EXPERTS_FORMAT_VERSION:
        raise ModuleError(
            f"{path}: written by posthoc {info.get('posthoc_version', '?')} with experts format {version!r}; this "
            f"posthoc ({__version__}) reads format {EXPERTS_FORMAT_VERSION}: use that posthoc version or "
            "run `posthoc split moe` again"
        )
    return manifest, info


def read_output(cls: Any, directory: Path) -> Any:
    """An MoEfier restored from an output directory (ready for `apply`)."""
    manifest, info = read_structure(directory)
    tensors = load_file(str(directory / "experts.safetensors"))
    params = dict(info["params"])
    moe = cls(**params)
    layers = info["layers"]
    moe.ffns_ = None
    moe.ffn_specs_ = [layer["ffn"] for layer in layers]
    moe.orders_ = [tensors[f"{i}.order"] for i in range(len(layers))]
    moe.sizes_ = [list(layer["sizes"]) for layer in layers]
    moe.shared_ = [int(layer["shared"]) for layer in layers]
    moe.top_k_ = [int(layer["top_k"]) for layer in layers]
    moe.thresholds_ = [layer.get("threshold") for layer in layers]
    moe.recall_ = [layer.get("recall", {}) for layer in layers]
    moe.routers_ = []
    moe.heal_state_ = []
    d = int(tensors["0.router.centroid.weight"].shape[1])
    for i, layer in enumerate(layers):
        routers = {}
        for kind, shape in layer["routers"].items():
            router = make_router(kind, d, len(moe.sizes_[i]), shape.get("hidden"), sizes=moe.sizes_[i])
            prefix = f"{i}.router.{kind}."
            router.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            routers[kind] = router.eval()
        moe.routers_.append(routers)
        prefix = f"{i}.heal."
        moe.heal_state_.append({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    moe.compensation_ = [tensors[f"{i}.compensation"] for i in range(len(layers))] if "0.compensation" in tensors else None
    moe.tokens_ = info.get("tokens")
    moe.calibration_ = info.get("calibration")
    moe.timings_ = info.get("timings", {})
    moe.model_type_ = info.get("model_type")
    moe.heal_log_ = info.get("healing")
    moe.source_ = None
    moe.manifest_ = manifest
    moe.info_ = info
    return moe
