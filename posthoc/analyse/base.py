"""The analyser contract (scikit-learn's estimator contract), kept by MoEfier, NeuronClusterer, SubnetworkMasker.

    class MoEfier(Analyser, params=PARAMS): ...

    moe = MoEfier(experts=8)          # stores the parameters, checks only their names
    moe.set_params(top_k=2)           # returns moe; get_params() reads the same attributes
    moe.fit(model, data)              # validates them through the table, learns, returns moe

- `__init__` and `set_params` store each declared parameter once, as an attribute; an unknown name is
  refused, a bad value is refused by `validate_params` at the start of `fit` (so `set_params` cannot skip it);
- what `fit` learned lives in attributes whose names end in `_`, and nothing else is set on the analyser;
- `fit` leaves the caller's model as it was: weights, every parameter's requires_grad, every module's
  train/eval mode (`frozen`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar

from torch import nn

from posthoc.analyse.params import ParamTable
from posthoc.errors import ConfigError
from posthoc.models import load_model

A = TypeVar("A", bound="Analyser")


class Analyser:
    """Base of the analysers: parameters declared in one `ParamTable`, stored once, validated at fit time."""

    PARAMS: ClassVar[ParamTable]

    def __init_subclass__(cls, *, params: ParamTable | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if params is not None:  # a subclass of an analyser keeps its table
            cls.PARAMS = params

    def __init__(self, **params: Any) -> None:
        self.PARAMS.check_names(list(params))
        for p in self.PARAMS:
            setattr(self, p.name, params.get(p.name, p.default))

    def get_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.PARAMS.params}

    def set_params(self: A, **params: Any) -> A:
        self.PARAMS.check_names(list(params))
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def validate_params(self) -> None:
        """ConfigError in the table's words for the first bad value ("The 'top_k' parameter of MoEfier must be
        an int in [1, experts]. Got 0 instead."); `fit` calls it before anything else."""
        self.PARAMS.validate(self.get_params())

    def model_for_fit(self, model: Any, tokenizer: Any, *, needs_tokenizer: bool = True) -> tuple[nn.Module, Any]:
        """(model, tokenizer) that `fit` works on: a checkpoint spec (directory, GGUF, hub id) is loaded and
        `source_` set to its directory; a loaded model is taken as given (`source_` None), with its tokenizer."""
        self.source_ = None
        if isinstance(model, (str, os.PathLike)):
            model, tokenizer, self.source_ = load_model(model)
        elif tokenizer is None and needs_tokenizer:
            raise ConfigError(
                f"{type(self).__name__}.fit: pass tokenizer= with a loaded model (or give a checkpoint path)"
            )
        return model, tokenizer

    def is_fitted(self) -> bool:
        return any(name.endswith("_") and not name.startswith("_") for name in vars(self))

    def check_fitted(self) -> None:
        if not self.is_fitted():
            raise ConfigError(f"this {type(self).__name__} is not fitted yet; call fit(model, data) first")

    def __repr__(self) -> str:
        defaults = self.PARAMS.defaults()
        changed = [f"{name}={value!r}" for name, value in self.get_params().items() if not _same(value, defaults[name])]
        return f"{type(self).__name__}({', '.join(changed)})"


def _same(value: Any, default: Any) -> bool:
    try:
        return type(value) is type(default) and bool(value == default)
    except Exception:  # a value whose == is not a bool (e.g. an array): shown
        return False


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block `model` is in eval mode with no parameter requiring gradients (an analyser trains
    copies or masks, never the model); after it, every module's train/eval mode and every parameter's
    requires_grad are what they were, whatever happened inside."""
    modes = [(module, module.training) for module in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)
