"""Find the feed-forward blocks (FFNs) of a transformer, read their weights, and define neuron activation.

An FFN here is three (or two) linear maps and an element-wise activation:

    gelu-style (BERT):   y = W_down · act(W_up x + b_up) + b_down         intermediate.dense, output.dense
    glu-style (Llama):   y = W_down · (act(W_gate x) ⊙ W_up x)             gate_proj, up_proj, down_proj

Its *neurons* are the d_ff rows of W_up (and W_gate) and the matching columns of W_down, and
`h = act(...)` (the input of W_down, shape (tokens, d_ff)) is the *neuron activation vector*.

FFNs are found from the module tree, not from class names: a module with `intermediate.dense`,
`intermediate.intermediate_act_fn` and `output.dense` is BERT-style (BERT, RoBERTa, MiniLM, ELECTRA…),
a module with `gate_proj`, `up_proj`, `down_proj` and `act_fn` is Llama-style (Llama, Mistral, Qwen2,
SmolLM…). Other models name their FFN modules explicitly with `ffn_modules` (CLI `--ffn-modules`):
"up=PATTERN,down=PATTERN[,gate=PATTERN][,act=NAME]", patterns in fnmatch syntax over module names with
`*` for the layer number, e.g. "up=transformer.h.*.mlp.c_fc,down=transformer.h.*.mlp.c_proj,act=gelu_new".

Neuron activation (the one definition every analyser uses)
-----------------------------------------------------------
MoEfication counts a ReLU neuron as active when h > 0 and weighs it by h. GELU and SiLU neurons are never
exactly zero and can be strongly negative, so posthoc defines the activation *score* of neuron i on a
token as

    magnitude:   a_i = |h_i|
    output:      a_i = |h_i| · ‖W_down[:, i]‖₂        (WINA: what the neuron adds to the FFN output)

For ReLU both reduce to MoEfication's positive activation (up to the column norm). An expert's
*activation mass* on a token is the sum of its neurons' scores; the oracle router picks the experts of
largest mass. `neuron_scores` below is the single implementation.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from posthoc.errors import ConfigError, PosthocError

SCORES = ("magnitude", "output")


class FFNNotFoundError(PosthocError):
    """No feed-forward block was recognised (or the ones named do not exist)."""


FFN_OPTION_HELP = (
    "point at the FFN modules with --ffn-modules 'up=PATTERN,down=PATTERN[,gate=PATTERN][,act=NAME]' "
    "(library: ffn_modules=...), patterns over module names with * for the layer number"
)


@dataclass(frozen=True)
class FFN:
    """One feed-forward block of a model: where its linear maps are, and its activation function."""

    index: int  # 0..n-1 in model order
    name: str  # the common prefix of its modules, e.g. "encoder.layer.3"
    up: str  # module path of W_up (BERT: intermediate.dense)
    down: str  # module path of W_down
    gate: str | None  # module path of W_gate (glu-style only)
    act: Callable[[torch.Tensor], torch.Tensor]
    act_name: str

    @property
    def style(self) -> str:
        return "glu" if self.gate is not None else "gelu" if "gelu" in self.act_name else "act"

    def modules(self, model: nn.Module) -> tuple[nn.Linear, nn.Linear | None, nn.Linear]:
        """(up, gate, down) Linear modules of this FFN in `model`."""
        return get_module(model, self.up), get_module(model, self.gate) if self.gate else None, get_module(
            model, self.down
        )

    def describe(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "up": self.up, "gate": self.gate, "down": self.down, "act": self.act_name}


def get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise FFNNotFoundError(f"the model has no module {path!r}; {FFN_OPTION_HELP}") from None


def _act_name(fn: Any) -> str:
    return type(fn).__name__ if isinstance(fn, nn.Module) else getattr(fn, "__name__", str(fn))


def _is_linear(module: Any) -> bool:
    return isinstance(module, nn.Linear)


def _layer_sort_key(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def find_ffns(model: nn.Module, ffn_modules: str | dict[str, str] | None = None) -> list[FFN]:
    """Every FFN of `model`, in module order. `ffn_modules` names them for models posthoc does not know."""
    if ffn_modules:
        return _named_ffns(model, parse_ffn_modules(ffn_modules))
    found: list[FFN] = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        intermediate, output = getattr(module, "intermediate", None), getattr(module, "output", None)
        if (
            intermediate is not None
            and _is_linear(getattr(intermediate, "dense", None))
            and callable(getattr(intermediate, "intermediate_act_fn", None))
            and _is_linear(getattr(output, "dense", None))
        ):
            act = intermediate.intermediate_act_fn
            found.append(
                FFN(0, name, f"{prefix}intermediate.dense", f"{prefix}output.dense", None, act, _act_name(act))
            )
        elif all(_is_linear(getattr(module, n, None)) for n in ("gate_proj", "up_proj", "down_proj")) and callable(
            getattr(module, "act_fn", None)
        ):
            act = module.act_fn
            found.append(FFN(0, name, f"{prefix}up_proj", f"{prefix}down_proj", f"{prefix}gate_proj", act, _act_name(act)))
    if not found:
        arch = type(model).__name__
        raise FFNNotFoundError(
            f"{arch}: no feed-forward block recognised (posthoc knows BERT-style intermediate.dense/output.dense "
            f"and Llama-style gate_proj/up_proj/down_proj); {FFN_OPTION_HELP}"
        )
    return [FFN(i, f.name, f.up, f.down, f.gate, f.act, f.act_name) for i, f in enumerate(found)]


def parse_ffn_modules(spec: str | dict[str, str]) -> dict[str, str]:
    """'up=P,down=P[,gate=P][,act=NAME]' (or the same as a dict) -> dict, checked."""
    if isinstance(spec, str):
        items: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = part.partition("=")
            if not sep or not value.strip():
                raise ConfigError(f"--ffn-modules: {part!r} is not KEY=VALUE; {FFN_OPTION_HELP}")
            items[key.strip()] = value.strip()
    else:
        items = dict(spec)
    unknown = sorted(set(items) - {"up", "down", "gate", "act"})
    if unknown or "up" not in items or "down" not in items:
        raise ConfigError(
            f"--ffn-modules needs up= and down= (and optionally gate=, act=); got keys {sorted(items)}; {FFN_OPTION_HELP}"
        )
    return items


def _named_ffns(model: nn.Module, spec: dict[str, str]) -> list[FFN]:
    names = [n for n, _ in model.named_modules()]

    def matches(pattern: str) -> list[str]:
        hits = sorted((n for n in names if fnmatch.fnmatchcase(n, pattern)), key=_layer_sort_key)
        if not hits:
            raise FFNNotFoundError(f"--ffn-modules: no module matches {pattern!r} in {type(model).__name__}")
        for hit in hits:
            if not _is_linear(model.get_submodule(hit)):
                raise FFNNotFoundError(
                    f"--ffn-modules: {hit} is a {type(model.get_submodule(hit)).__name__}, not a torch Linear"
                )
        return hits

    ups, downs = matches(spec["up"]), matches(spec["down"])
    gates = matches(spec["gate"]) if "gate" in spec else [None] * len(ups)
    if not len(ups) == len(downs) == len(gates):
        raise FFNNotFoundError(
            f"--ffn-modules: {len(ups)} up, {len(downs)} down and {len(gates)} gate modules matched; "
            "each FFN needs one of each"
        )
    from transformers.activations import ACT2FN

    act_name = spec.get("act") or getattr(getattr(model, "config", None), "hidden_act", None)
    if act_name not in ACT2FN:
        raise ConfigError(
            f"--ffn-modules: activation {act_name!r} unknown; give act=NAME with one of {', '.join(sorted(ACT2FN))}"
        )
    act = ACT2FN[act_name]
    ffns = []
    for i, (up, gate, down) in enumerate(zip(ups, gates, downs)):
        prefix = re.sub(r"\.[^.]*$", "", up)
        ffns.append(FFN(i, prefix, up, down, gate, act, act_name))
    return ffns


# --------------------------------------------------------------------------------------------- weights


@dataclass
class FFNWeights:
    """An FFN's weights as plain float tensors (copies, detached): the analysers' view of one block.

    up, gate: (d_ff, d); down: (d, d_ff); biases (d_ff,) / (d,) or None.
    """

    up: torch.Tensor
    down: torch.Tensor
    act: Callable[[torch.Tensor], torch.Tensor]
    up_bias: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def d_ff(self) -> int:
        return self.up.shape[0]

    @property
    def d_model(self) -> int:
        return self.up.shape[1]

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Neuron activations h = act(W_up x + b) or act(W_gate x) ⊙ W_up x: (tokens, d) -> (tokens, d_ff)."""
        up = nn.functional.linear(x, self.up, self.up_bias)
        if self.gate is None:
            return self.act(up)
        return self.act(nn.functional.linear(x, self.gate, self.gate_bias)) * up

    def output(self, h: torch.Tensor) -> torch.Tensor:
        """FFN output from neuron activations: (tokens, d_ff) -> (tokens, d)."""
        return nn.functional.linear(h, self.down, self.down_bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.hidden(x))

    def down_norms(self) -> torch.Tensor:
        """‖W_down[:, i]‖₂ per neuron: (d_ff,)."""
        return self.down.float().norm(dim=0)

    def permuted(self, order: torch.Tensor) -> FFNWeights:
        """The same function with neurons reordered (rows of up/gate, columns of down)."""

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[order].contiguous()

        return FFNWeights(
            self.up[order].contiguous(), self.down[:, order].contiguous(), self.act, take(self.up_bias),
            take(self.gate), take(self.gate_bias), self.down_bias,
        )


def ffn_weights(model: nn.Module, ffn: FFN, dtype: torch.dtype = torch.float32) -> FFNWeights:
    """Copies of one FFN's weights, in `dtype`."""
    up, gate, down = ffn.modules(model)

    def c(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().to(dtype).clone()

    return FFNWeights(
        c(up.weight), c(down.weight), ffn.act, c(up.bias), c(gate.weight) if gate else None,
        c(gate.bias) if gate else None, c(down.bias),
    )


def neuron_scores(h: torch.Tensor, down_norms: torch.Tensor | None = None, score: str = "magnitude") -> torch.Tensor:
    """The activation score of every neuron on every token (see the module docstring): (T, d_ff) -> (T, d_ff).

    `score` is "magnitude" (|h|) or "output" (|h| · ‖W_down[:, i]‖, needs `down_norms`).
    """
    if score == "magnitude":
        return h.abs()
    if score == "output":
        if down_norms is None:
            raise ConfigError("the 'output' neuron score needs the FFN's down-projection column norms")
        return h.abs() * down_norms.to(h.dtype)
    raise ConfigError(f"neuron score {score!r} is unknown; use one of {', '.join(SCORES)}")
