"""Merge configurations: mergekit's YAML (the `models:` form) read as is, and resolved per tensor.

A parameter value ("setting") is one of
- a scalar:                                   `density: 0.5`
- a gradient, interpolated over the layers:   `t: [0, 0.5, 1]`   (layer k of L gets position k/(L−1);
  tensors outside the layers — embeddings, final norm, head — get position 0)
- filters, the first matching one wins:       `t: [{filter: self_attn, value: 0.3}, {value: 0.7}]`
  (`filter` is a case-sensitive substring of the tensor name; no filter or "*" matches everything;
  a value may itself be a gradient)
Per-model values take precedence over top-level `parameters`, then the method's default.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from posthoc.checkpoint import parse_dtype
from posthoc.errors import CheckpointError, ConfigError
from posthoc.merge.registry import REGISTRY, MergeMethod, get_method
from posthoc.modules.apply import split_ref

TOP_LEVEL_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer",
    "tokenizer_source",
    "name",
)
UNSUPPORTED_KEYS = {
    "slices": "use `models:` (layer slicing is not supported yet)",
    "modules": "use `models:` (per-module configs are not supported yet)",
    "chat_template": "remove it; the chat template is copied from the tokenizer source",
}
NO_VALUE = object()
LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass
class ModelEntry:
    model: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeConfig:
    merge_method: str
    models: list[ModelEntry]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    tokenizer_source: str | None = None  # None: copy from the base (or first model), no vocabulary alignment
    source_text: str | None = None  # the YAML as written, kept in the output for provenance

    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)

    @classmethod
    def from_yaml(cls, path: str | Path) -> MergeConfig:
        path = Path(path)
        try:
            text = path.read_text()
            data = yaml.safe_load(text)
        except OSError as error:
            raise ConfigError(f"{path}: cannot read ({error.strerror})") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
        config = cls.from_dict(data, where=str(path))
        config.source_text = text
        return config

    @classmethod
    def from_dict(cls, data: Any, where: str = "config") -> MergeConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping with merge_method and models")
        for key in data:
            if key in UNSUPPORTED_KEYS:
                raise ConfigError(f"{where}: `{key}` is not supported: {UNSUPPORTED_KEYS[key]}")
            if key not in TOP_LEVEL_KEYS:
                raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {', '.join(TOP_LEVEL_KEYS)}")
        if "merge_method" not in data:
            raise ConfigError(f"{where}: missing `merge_method`")
        method = get_method(str(data["merge_method"]))
        models = []
        for i, entry in enumerate(data.get("models") or []):
            if isinstance(entry, str):
                entry = {"model": entry}
            if not isinstance(entry, dict) or "model" not in entry:
                raise ConfigError(f"{where}: models[{i}] needs a `model:` path")
            unknown = set(entry) - {"model", "parameters"}
            if unknown:
                raise ConfigError(f"{where}: models[{i}] has unknown key {sorted(unknown)[0]!r}; valid: model, parameters")
            models.append(ModelEntry(_model_ref(entry["model"], where), dict(entry.get("parameters") or {})))
        if not models:
            raise ConfigError(f"{where}: `models` is empty; list the models to merge")
        if "tokenizer" in data and "tokenizer_source" in data:
            raise ConfigError(f"{where}: give either `tokenizer` or the legacy `tokenizer_source`, not both")
        tokenizer = data.get("tokenizer")
        source = data.get("tokenizer_source")
        if tokenizer is not None:
            if not isinstance(tokenizer, dict) or set(tokenizer) - {"source"}:
                raise ConfigError(f"{where}: `tokenizer` supports only `source: base | PATH`")
            source = tokenizer.get("source")
        if source == "union":
            raise ConfigError(f"{where}: tokenizer source `union` is not supported; use `base` or a model path")
        try:
            dtype = parse_dtype(data.get("dtype"))
            out_dtype = parse_dtype(data.get("out_dtype"))
        except CheckpointError as error:
            raise ConfigError(f"{where}: {error}") from None
        config = cls(
            merge_method=method.name,
            models=models,
            base_model=_model_ref(data["base_model"], where) if data.get("base_model") is not None else None,
            parameters=dict(data.get("parameters") or {}),
            dtype=dtype,
            out_dtype=out_dtype,
            tokenizer_source=None if source is None else str(source),
        )
        config.check(where)
        return config

    @classmethod
    def from_flags(
        cls,
        method: str,
        base: str | None,
        models: Sequence[str],
        weights: Sequence[float] = (),
        settings: Mapping[str, Any] | None = None,
        *,
        dtype: str | None = None,
        out_dtype: str | None = None,
    ) -> MergeConfig:
        """The config a flag-form merge stands for (`posthoc merge --method ties --base B M1 M2 --density 0.2`).

        A method with a `weight` gets one weight for every model or one per model (default 1); `settings` are
        the top-level `parameters`. Checked like a YAML config (errors say "flags")."""
        if weights and len(weights) not in (1, len(models)):
            raise ConfigError(f"give one --weight for all models or one per model ({len(models)}), got {len(weights)}")
        spec = REGISTRY.get(method)  # an unknown name is refused by from_dict, listing the valid ones
        entries = []
        for i, model in enumerate(models):
            parameters = {}
            if spec is not None and "weight" in spec.params:
                parameters["weight"] = weights[i] if len(weights) == len(models) else (weights[0] if weights else 1.0)
            entries.append({"model": model, **({"parameters": parameters} if parameters else {})})
        data: dict[str, Any] = {"merge_method": method, "models": entries}
        if base:
            data["base_model"] = base
        if settings:
            data["parameters"] = dict(settings)
        if dtype:
            data["dtype"] = dtype
        if out_dtype:
            data["out_dtype"] = out_dtype
        return cls.from_dict(data, where="flags")

    def inputs(self) -> tuple[str | None, list[ModelEntry]]:
        """(base, merged inputs) as the method sees them.

        For a method that ignores the base, a configured base is one more ordinary input (appended when
        not listed); for the others the base is taken out of the list.
        """
        method = self.method
        listed = [m for m in self.models if m.model != self.base_model]
        if method.base == "ignored":
            base_entry = [m for m in self.models if m.model == self.base_model]
            if self.base_model is not None and not base_entry:
                base_entry = [ModelEntry(self.base_model)]
            return None, listed + base_entry
        return self.base_model, listed

    def check(self, where: str = "config") -> None:
        """Everything that can be checked without opening a model: counts, names, ranges."""
        method = self.method
        base, inputs = self.inputs()
        if method.base == "required" and base is None:
            raise ConfigError(f"{where}: {method.name} needs a `base_model`")
        count = len(inputs)
        if count < method.min_models or (method.max_models is not None and count > method.max_models):
            expected = (
                f"exactly {method.min_models}"
                if method.max_models == method.min_models
                else f"at least {method.min_models}"
                if method.max_models is None
                else f"{method.min_models} to {method.max_models}"
            )
            with_base = " besides the base" if method.base != "ignored" else ""
            total = {"slerp": " (slerp merges exactly two models: the base and one other)",
                     "model_stock": " (model_stock needs the base and at least two fine-tunes: three models)"}
            raise ConfigError(
                f"{where}: {method.name} takes {expected} model(s){with_base}, got {count}{total.get(method.name, '')}"
            )
        valid = ", ".join(method.params) or "none"
        for name, setting in self.parameters.items():
            if name not in method.params:
                raise ConfigError(f"{where}: {method.name} has no parameter {name!r}; valid parameters: {valid}")
            _check_setting(method, name, setting, f"{where}: parameters.{name}")
        for entry in self.models:
            for name, setting in entry.parameters.items():
                spec = method.params.get(name)
                if spec is None:
                    raise ConfigError(
                        f"{where}: {method.name} has no parameter {name!r} (model {entry.model}); valid parameters: {valid}"
                    )
                if not spec.scope.per_model:
                    raise ConfigError(
                        f"{where}: parameter {name!r} of {method.name} is global; move it from model "
                        f"{entry.model} to the top-level `parameters`"
                    )
                _check_setting(method, name, setting, f"{where}: model {entry.model} parameter {name}")
        for name, spec in method.params.items():
            if not spec.required or name in self.parameters:
                continue
            lacking = [m.model for m in inputs if name not in m.parameters] if spec.scope.per_model else [None]
            if lacking:
                whose = f" for model {lacking[0]}" if lacking[0] else ""
                raise ConfigError(f"{where}: {method.name} needs parameter {name!r}{whose}")

    def resolve(self, tensor_name: str, position: float) -> dict[str, Any]:
        """Keyword arguments of the method for one tensor: scalars for globals, lists for per-model ones."""
        method = self.method
        _, inputs = self.inputs()
        where = f"for tensor {tensor_name}"
        resolved: dict[str, Any] = {}
        for name, spec in method.params.items():
            if spec.scope.per_model:
                values = []
                for entry in inputs:
                    value = NO_VALUE
                    for scope in (entry.parameters, self.parameters):
                        if name in scope:
                            value = evaluate_setting(scope[name], tensor_name, position)
                            if value is not NO_VALUE:
                                break
                    if value is NO_VALUE:
                        if spec.required:
                            raise ConfigError(f"parameter {name!r} has no value {where} of model {entry.model}")
                        value = spec.default
                    values.append(spec.validate(value, f"of model {entry.model} {where}"))
                resolved[spec.argument] = values
            else:
                value = evaluate_setting(self.parameters[name], tensor_name, position) if name in self.parameters else NO_VALUE
                if value is NO_VALUE:
                    if spec.required:
                        raise ConfigError(f"parameter {name!r} has no value {where}")
                    value = spec.default
                resolved[spec.argument] = spec.validate(value, where)
        if method.validate is not None:
            method.validate({spec.name: resolved[spec.argument] for spec in method.params.values()}, where)
        return resolved

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model:
            data["base_model"] = self.base_model
        data["models"] = [{"model": m.model, **({"parameters": m.parameters} if m.parameters else {})} for m in self.models]
        if self.parameters:
            data["parameters"] = self.parameters
        for key in ("dtype", "out_dtype"):
            value = getattr(self, key)
            if value is not None:
                data[key] = str(value).replace("torch.", "")
        if self.tokenizer_source:
            data["tokenizer"] = {"source": self.tokenizer_source}
        return data


def _model_ref(value: Any, where: str) -> str:
    ref = str(value)
    # mergekit's `MODEL+ADAPTER`: the part after '+' must be a module or PEFT adapter directory (posthoc.modules)
    if "+" in ref and not Path(ref).exists() and split_ref(ref) is None:
        raise ConfigError(
            f"{where}: model {ref!r}: in `MODEL+MODULE` the part after '+' must be a module or PEFT adapter "
            "directory (with module.json or adapter_config.json)"
        )
    return ref


def _check_setting(method: MergeMethod, name: str, setting: Any, where: str) -> None:
    """Validate every scalar a setting can produce (all gradient points and filter values)."""
    spec = method.params[name]
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            raise ConfigError(f"{where}: empty list")
        for item in setting:
            if isinstance(item, dict):
                unknown = set(item) - {"filter", "value"}
                if unknown or "value" not in item:
                    raise ConfigError(f"{where}: a filter entry needs `value` (and optional `filter`), got {item}")
                _check_setting(method, name, item["value"], where)
            else:
                spec.validate(item, where)
        return
    spec.validate(setting, where)


def evaluate_setting(setting: Any, tensor_name: str, position: float) -> Any:
    """The value of a setting for a tensor at a layer position in [0, 1] (see the module docstring)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if setting and all(isinstance(item, dict) for item in setting):
            for item in setting:
                pattern = item.get("filter")
                if pattern is None or pattern == "*" or str(pattern) in tensor_name:
                    return evaluate_setting(item["value"], tensor_name, position)
            return NO_VALUE
        if not setting:
            return NO_VALUE
        if len(setting) == 1:
            return setting[0]
        numbers = [_as_number(v) for v in setting]
        if any(v is None for v in numbers):  # booleans and strings step instead of interpolating
            return setting[math.floor(position * (len(setting) - 1))]
        scaled = position * (len(numbers) - 1)
        low = math.floor(scaled)
        high = min(len(numbers) - 1, low + 1)
        frac = scaled - low
        return (1 - frac) * numbers[low] + frac * numbers[high]
    return setting


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def layer_position(tensor_name: str, num_layers: int | None) -> float:
    """Position in [0, 1] of the layer a tensor belongs to (0 for tensors outside the layer stack)."""
    match = LAYER_INDEX.search(tensor_name)
    if match is None:
        return 0.0
    index = int(match.group(1))
    layers = num_layers or index + 1
    return index / (layers - 1) if layers > 1 else 1.0


def num_layers(config: dict[str, Any], tensor_names: list[str]) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    indices = [int(m.group(1)) for n in tensor_names if (m := LAYER_INDEX.search(n))]
    return max(indices) + 1 if indices else None
