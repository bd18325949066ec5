"""PEFT adapters as modules: read one made elsewhere, and write ours so that PEFT loads it.

A `lora` module directory is at the same time a PEFT adapter: `adapter_config.json` +
`adapter_model.safetensors`, with PEFT's key names (`base_model.model.<module>.lora_A.weight` …), so
`peft.PeftModel.from_pretrained(model, directory)` loads it unchanged. What a PEFT LoRA cannot say as a
low-rank change (a changed LayerNorm, a bias, a matrix too small to be worth factoring) goes where PEFT
looks for it: the biases of LoRA-targeted layers with `bias: "lora_only"`, every other changed module in
`modules_to_save`. Both hold *new values*, not changes, so the module also keeps the change itself (in
`module.safetensors`) and PEFT's copies are written from base + change.

PEFT adapters made elsewhere are accepted when their effect is exactly a sum of per-weight changes:
plain LoRA (any rank per layer, `rank_pattern`/`alpha_pattern`, rsLoRA's α/√r scaling), biases and
`modules_to_save`. Variants whose effect is not a fixed weight change (DoRA's column renormalisation,
activated LoRA, trainable tokens …) or that are relative to a modified base (PiSSA, OLoRA, CorDA, LoftQ,
LoRA-GA initialisations) are refused with one line that says why and what to do instead.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posthoc.checkpoint import Checkpoint
from posthoc.modules.format import BaseRef, Manifest, ModuleError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_STEM = "adapter_model"
PREFIX = "base_model.model."

# Options whose effect is not a fixed per-weight change (or needs layers posthoc does not factor yet).
_REFUSED: tuple[tuple[str, str], ...] = (
    ("use_dora", "DoRA rescales each weight column by a learned magnitude, so its change depends on the base "
     "weights and is not a low-rank sum"),
    ("use_qalora", "QA-LoRA pools its inputs group-wise, which is not a plain weight change"),
    ("lora_bias", "lora_B carries a bias of its own"),
    ("layer_replication", "it duplicates layers of the base"),
    ("target_parameters", "it targets raw parameters (e.g. MoE experts) rather than layers"),
    ("trainable_token_indices", "it trains single embedding rows through a separate mechanism"),
    ("alora_invocation_tokens", "activated LoRA applies only after its invocation tokens, not as a weight change"),
    ("use_bdlora", "block-diagonal LoRA shares factors across layers"),
    ("arrow_config", "Arrow routes between several LoRAs per token"),
    ("megatron_config", "Megatron-parallel layers are split across devices"),
    ("fan_in_fan_out", "its layers store weights transposed (GPT-2 Conv1D), which posthoc does not map yet"),
)
_MODIFIED_BASE = ("pissa", "olora", "corda", "loftq", "lora_ga")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)$")


def _unsupported(path: Path, what: str, why: str) -> ModuleError:
    return ModuleError(
        f"{path}: PEFT adapter uses {what}, which posthoc cannot represent exactly ({why}); merge it into a "
        "checkpoint with PEFT's merge_and_unload() and use that checkpoint instead"
    )


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """adapter_config.json of a PEFT LoRA, refused (one line) when its variant is not a plain weight change."""
    path = Path(path)
    file = path / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise ModuleError(f"{path}: no {ADAPTER_CONFIG}: not a PEFT adapter") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModuleError(f"{file}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ModuleError(f"{file}: expected a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise _unsupported(path, f"peft_type {config.get('peft_type')!r}", "only LoRA adapters are weight changes posthoc maps")
    for option, why in _REFUSED:
        value = config.get(option)
        if value not in (None, False, [], {}, ""):
            raise _unsupported(path, f"{option}: {json.dumps(value)}", why)
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(_MODIFIED_BASE):
        raise _unsupported(
            path, f"init_lora_weights: {init!r}", "its factors are relative to a modified (residual) base, not to the "
            "base model; convert it with PEFT's save_pretrained(path_initial_model_for_weight_conversion=...)"
        )
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise ModuleError(f"{file}: field 'bias' is {config.get('bias')!r}; expected none, all or lora_only")
    for key in ("r", "lora_alpha"):
        value = config.get(key, 8)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ModuleError(f"{file}: field {key!r} must be a positive number, got {value!r}")
    return config


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's lookup of rank_pattern/alpha_pattern: the first key matching the end of the module name."""
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def adapter_weight_files(path: Path) -> list[Path]:
    for name in (f"{ADAPTER_STEM}.safetensors", f"{ADAPTER_STEM}.bin"):
        if (path / name).is_file():
            return [path / name]
    raise ModuleError(f"{path}: has {ADAPTER_CONFIG} but no {ADAPTER_STEM}.safetensors (or .bin)")


def synthesize_manifest(path: str | Path) -> Manifest:
    """The manifest of a PEFT LoRA adapter made elsewhere (no module.json): one entry per changed base tensor."""
    path = Path(path)
    config = read_adapter_config(path)
    files = adapter_weight_files(path)
    with Checkpoint(path, files, str(path)) as adapter:
        infos = dict(adapter.tensors)
    factors: dict[str, dict[str, str]] = {}
    layouts: dict[str, str] = {}
    entries: dict[str, dict[str, Any]] = {}
    for key, info in infos.items():
        bare = key[len(PREFIX):] if key.startswith(PREFIX) else key
        match = _LORA_KEY.match(bare) or _EMBEDDING_KEY.match(bare)
        if match:
            module, part = match.group("module"), match.group("part")
            factors.setdefault(module, {})["A" if part.endswith("A") else "B"] = key
            layouts[module] = "embedding" if "embedding" in part else "linear"
            continue
        if "lora_" in bare or not bare.endswith((".weight", ".bias")):
            raise _unsupported(path, f"tensor {key!r}", "it is not a LoRA factor, a bias or a saved module's weight")
        if ".original_module." in bare:  # bias="all" also saves the frozen original of a saved module: unused
            continue
        wrapped = ".modules_to_save." in bare  # bias="all" saves a saved module's bias under its wrapper too
        tensor = bare.replace(".base_layer.", ".").replace(".modules_to_save.", ".")
        if tensor in entries and wrapped:
            continue
        entries[tensor] = {"storage": "absolute", "shape": list(info.shape), "file": ADAPTER_STEM, "key": key}
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    for module, parts in factors.items():
        if set(parts) != {"A", "B"}:
            missing = "A" if "A" not in parts else "B"
            raise ModuleError(f"{path}: module {module!r} has a lora_B but no lora_A" if missing == "A"
                              else f"{path}: module {module!r} has a lora_A but no lora_B")
        a, b = infos[parts["A"]].shape, infos[parts["B"]].shape
        if len(a) != 2 or len(b) != 2:
            raise ModuleError(f"{path}: LoRA factors of {module!r} must be matrices, got {list(a)} and {list(b)}")
        linear = layouts[module] == "linear"
        rank = a[0]  # lora_A (r, in) / lora_embedding_A (r, num); lora_B (out, r) / lora_embedding_B (dim, r)
        if b[1] != rank:
            raise ModuleError(f"{path}: LoRA factors of {module!r} disagree on the rank: {list(a)} and {list(b)}")
        configured = _pattern_value(config.get("rank_pattern") or {}, module, r_default)
        if configured != rank:
            raise ModuleError(
                f"{path}: module {module!r} stores rank {rank} but adapter_config.json says r={configured}; "
                "the scaling alpha/r would be wrong"
            )
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, alpha_default)
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        # Base shape: linear φ = s·B A is (out, in) = (b[0], a[1]); embedding φ = s·(B A)ᵀ is (a[1], b[0]).
        shape = [b[0], a[1]] if linear else [a[1], b[0]]
        entries[f"{module}.weight"] = {
            "storage": "lora", "shape": shape, "file": ADAPTER_STEM, "A": parts["A"], "B": parts["B"],
            "rank": int(rank), "scale": float(scale), "layout": layouts[module],
        }
    if not entries:
        raise ModuleError(f"{path}: the PEFT adapter holds no LoRA factors")
    base = BaseRef(None, "", str(config.get("base_model_name_or_path") or ""), None)
    return Manifest(
        kind="lora",
        base=base,
        tensors=entries,
        provenance={"made_by": "PEFT", "peft_version": config.get("peft_version"), "synthesized_by_posthoc": True},
    )


# ----------------------------------------------------------------------------------------- base layout


@dataclass
class BaseLayout:
    """Which module owns each tensor of a base, and which modules PEFT can give a LoRA.

    Learned from the model built on the meta device (no memory, no weights), so names are exactly those
    PEFT sees. `tied` maps an input embedding to the output layer that shares its weight: a LoRA on the
    embedding alone would not change that output layer in PEFT, so the same factors are put on both.
    """

    kinds: dict[str, str] = field(default_factory=dict)  # module name -> linear | embedding | other
    owner: dict[str, str] = field(default_factory=dict)  # tensor name -> module name
    members: dict[str, list[str]] = field(default_factory=dict)  # module name -> its tensors (recursively)
    tied: dict[str, str] = field(default_factory=dict)  # embedding module -> output module sharing its weight
    exact: bool = True  # False when the structure was guessed from names (no loadable config)

    def lora_layout(self, tensor: str, shape: tuple[int, ...]) -> str | None:
        module = self.owner.get(tensor)
        if module is None or len(shape) != 2 or not tensor.endswith(".weight"):
            return None
        kind = self.kinds.get(module)
        return kind if kind in ("linear", "embedding") else None

    @classmethod
    def of(cls, ckpt: Checkpoint) -> BaseLayout:
        try:
            return cls._from_model(ckpt)
        except Exception as error:  # transformers raises many types for configs it cannot build
            log.warning("%s: model structure guessed from tensor names (%s)", ckpt.source, error)
            return cls._guess(ckpt)

    @classmethod
    def _from_model(cls, ckpt: Checkpoint) -> BaseLayout:
        import transformers
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            config = transformers.AutoConfig.from_pretrained(str(ckpt.directory))
            arch = (ckpt.config.get("architectures") or [None])[0]
            model_cls = getattr(transformers, arch, None) if arch else None
            with torch.device("meta"):
                model = model_cls(config) if model_cls is not None else transformers.AutoModel.from_config(config)
        finally:
            hf_logging.set_verbosity(verbosity)
        layout = cls()
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                kind = "linear"
            elif isinstance(module, torch.nn.Embedding):
                kind = "embedding"
            else:
                kind = "other"
            layout.kinds[name] = kind
            for local, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                full = f"{name}.{local}" if name else local
                if full in ckpt.tensors:
                    layout.owner[full] = name
        for tensor, module in layout.owner.items():
            parts = module.split(".") if module else []
            for depth in range(len(parts) + 1):
                layout.members.setdefault(".".join(parts[:depth]), []).append(tensor)
        unknown = [t for t in ckpt.tensors if t not in layout.owner and ckpt.tensors[t].dtype.is_floating_point]
        if unknown:
            log.info("%s: %d tensors not owned by a module of %s (e.g. %s)", ckpt.source, len(unknown), type(model).__name__, unknown[0])
        inputs, outputs = model.get_input_embeddings(), None
        try:
            outputs = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            outputs = None
        if inputs is not None and outputs is not None and outputs.weight is inputs.weight:
            names = {id(m): n for n, m in model.named_modules()}
            if names.get(id(inputs)) is not None and names.get(id(outputs)) is not None:
                layout.tied[names[id(inputs)]] = names[id(outputs)]
        return layout

    @classmethod
    def _guess(cls, ckpt: Checkpoint) -> BaseLayout:
        layout = cls(exact=False)
        for name, info in ckpt.tensors.items():
            module, _, _ = name.rpartition(".")
            layout.owner[name] = module
            layout.members.setdefault(module, []).append(name)
            if name.endswith(".weight") and len(info.shape) == 2:
                embedding = any(h in module for h in ("embed", "wte", "wpe", "shared"))
                layout.kinds[module] = "embedding" if embedding else "linear"
            else:
                layout.kinds.setdefault(module, "other")
        return layout


def adapter_config(
    base_source: str,
    ranks: dict[str, int],
    modules_to_save: list[str],
    with_biases: bool,
) -> dict[str, Any]:
    """adapter_config.json for our factors: α = r everywhere, so PEFT's scaling α/r is 1 and φ = B A."""
    top = max(ranks.values()) if ranks else 1
    pattern = {module: rank for module, rank in sorted(ranks.items()) if rank != top}
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_source,
        "r": top,
        "lora_alpha": top,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "modules_to_save": sorted(modules_to_save) or None,
        "bias": "lora_only" if with_biases else "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def peft_factor_names(module: str, layout: str) -> tuple[str, str]:
    """PEFT's keys (A, B) for a module's factors."""
    if layout == "embedding":
        return f"{PREFIX}{module}.lora_embedding_A", f"{PREFIX}{module}.lora_embedding_B"
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"


def to_peft(B: torch.Tensor, A: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Our factors (φ = B A, B (m, r), A (r, n)) as PEFT stores them (lora_A, lora_B)."""
    if layout == "embedding":  # PEFT: φ = (lora_embedding_B @ lora_embedding_A)ᵀ = B A
        return B.T.contiguous(), A.T.contiguous()
    return A.contiguous(), B.contiguous()


def from_peft(lora_a: torch.Tensor, lora_b: torch.Tensor, layout: str, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's stored factors as ours, scale folded into B: φ = B A exactly."""
    lora_a, lora_b = lora_a.to(torch.float32), lora_b.to(torch.float32)
    if layout == "embedding":
        return (lora_a.T * scale).contiguous(), lora_b.T.contiguous()
    return (lora_b * scale).contiguous(), lora_a.contiguous()


def open_adapter_tensors(path: Path) -> Checkpoint:
    return Checkpoint(path, adapter_weight_files(path), str(path))

