"""The analyser contract (posthoc.analyse.base), checked over every registered analyser the way
tests/test_merge_methods.py checks every merge method; and the `posthoc split` options generated from the
analysers' parameter tables (`--router-hidden` among them)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from typing import Any

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from posthoc.cli import main
from safetensors.torch import load_file
from tiny_text import CLASSES, make_tiny_bert, synthetic_corpus

import posthoc
from posthoc.analyse.base import Analyser, frozen
from posthoc.analyse.moe.layers import moe_layers
from posthoc.analyse.moe.moefier import MoEfier
from posthoc.analyse.params import INT_LIST
from posthoc.analyse.registry import ANALYSERS, analyser
from posthoc.errors import ConfigError
from posthoc.finetune import ClassificationHead
from posthoc.models import load_model

FAST_MOE = {"max_tokens": 1500, "router_tokens": 600, "router_epochs": 2, "progress": False, "threads": 1}


@dataclasses.dataclass
class Case:
    """How to fit one analyser on the tiny model: its parameters and its fit call."""

    params: Callable[[], dict[str, Any]]
    fit: Callable[[Analyser, torch.nn.Module, Any, Any], Analyser]


CASES = {
    # router, compensation, LoRA, layer-wise and whole-model healing: every part of fit that trains
    "moe": Case(lambda: {"experts": 4, "top_k": 2, "compensation": True, "lora_rank": 2, "layer_heal_epochs": 1,
                         "heal_steps": 2, "heal_batch_size": 4, "heal_tokens": 300, **FAST_MOE},
                lambda a, model, tok, data: a.fit(model, data, tokenizer=tok)),
    # an activation graph with shuffles, label ties and ablations
    "cluster": Case(lambda: {"graph": "correlation", "n_clusters": 3, "shuffles": 2, "max_label_texts": 20,
                             "ablation_baselines": 1, "progress": False, "threads": 1},
                    lambda a, model, tok, data: a.fit(model, data, labels=data, tokenizer=tok)),
    # a head of the caller's, which must stay as it was too
    "mask": Case(lambda: {"steps": 3, "batch_size": 8, "max_length": 32, "head": ClassificationHead(32, CLASSES),
                          "progress": False, "threads": 1},
                 lambda a, model, tok, data: a.fit(model, data, tokenizer=tok)),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = make_tiny_bert(tmp_path_factory.mktemp("analysers") / "bert")
    model, tokenizer, _ = load_model(directory)
    return {"dir": directory, "model": model, "tokenizer": tokenizer, "data": synthetic_corpus(per_class=12)}


# ------------------------------------------------------------------------------------------ helpers


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """a and b hold the same values (tensors and arrays exactly, NaN equal to NaN); timings are skipped."""
    if a is b:
        return
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, torch.nn.Module):
        assert_same(a.state_dict(), b.state_dict(), where)
    elif isinstance(a, dict):
        keys = [k for k in a if not _timing(str(k))]
        assert keys == [k for k in b if not _timing(str(k))], where
        for k in keys:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == b or (math.isnan(a) and math.isnan(b)), f"{where}: {a} vs {b}"
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif hasattr(a, "__dict__") and not callable(a):
        assert_same(vars(a), vars(b), where)
    elif isinstance(a, (str, int, bool, type(None))):
        assert a == b, f"{where}: {a!r} vs {b!r}"
    else:  # e.g. a tokenizer's Rust objects
        assert repr(a) == repr(b), where


def _timing(name: str) -> bool:
    return "seconds" in name or "timings" in name


def learned(a: Analyser) -> dict[str, Any]:
    return {k: v for k, v in vars(a).items() if k not in a.PARAMS.params}


def model_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool], dict[str, bool]]:
    """(weights, requires_grad per parameter, training per module), copied."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {k: p.requires_grad for k, p in model.named_parameters()},
            {k: m.training for k, m in model.named_modules()})


def unusual_state(model: torch.nn.Module) -> None:
    """Train mode with one block in eval mode, the embeddings frozen: what `fit` must give back as it was."""
    model.train()
    model.encoder.layer[0].eval()
    for name, p in model.named_parameters():
        p.requires_grad_("embeddings" not in name)


# ------------------------------------------------------------------------------------------ the check


def check_analyser(cls: type[Analyser], case: Case, tiny: dict[str, Any]) -> None:
    table, owner = cls.PARAMS, cls.__name__
    params = case.params()
    model, tok, data = tiny["model"], tiny["tokenizer"], tiny["data"]

    # __init__ stores each parameter once; get_params round-trips; set_params returns the analyser
    assert cls().get_params() == table.defaults()
    a = cls(**params)
    assert set(vars(a)) == set(table.params) and not a.is_fitted()
    assert_same(a.get_params(), {**table.defaults(), **params})
    assert_same(cls(**a.get_params()).get_params(), a.get_params())
    assert a.set_params(seed=5) is a and a.get_params()["seed"] == 5 and a.seed == 5
    a.set_params(seed=params.get("seed", 0))
    assert repr(cls(seed=3, threads=1)) == f"{owner}(seed=3, threads=1)" and repr(cls()) == f"{owner}()"
    listing = re.escape(f"{owner} has no parameter 'no_such_parameter'; parameters: {', '.join(table.params)}")
    with pytest.raises(ConfigError, match=listing):
        cls(no_such_parameter=1)
    with pytest.raises(ConfigError, match=listing):
        a.set_params(no_such_parameter=1)

    # a bad value is stored as given and refused at fit, in the table's words, through __init__ or set_params
    bad = object()
    for p in table:
        message = re.escape(f"The {p.name!r} parameter of {owner} must be {p.valid}. Got {bad!r} instead.")
        for refused in (cls(**{**params, p.name: bad}), cls(**params).set_params(**{p.name: bad})):
            assert refused.get_params()[p.name] is bad
            with pytest.raises(ConfigError, match=message):
                case.fit(refused, model, tok, data)

    # fit returns the analyser; what it learned ends in "_"; the caller's model and parameters are as they were
    unusual_state(model)
    before = model_state(model)
    given = {k: (v, model_state(v)) for k, v in params.items() if isinstance(v, torch.nn.Module)}
    assert case.fit(a, model, tok, data) is a and a.is_fitted()
    assert learned(a) and all(k.endswith("_") and not k.startswith("_") for k in learned(a)), sorted(learned(a))
    assert_same(model_state(model), before, "model")
    for name, (module, state) in given.items():
        assert_same(model_state(module), state, name)
    assert_same(a.get_params(), {**table.defaults(), **params})

    # `threads` holds for the whole fit: no step (the calibration pass included) sets torch to more threads
    assert params.get("threads") == 1
    counts: list[int] = []
    original, previous = torch.set_num_threads, torch.get_num_threads()
    original(1)
    try:
        torch.set_num_threads = lambda n: (counts.append(n), original(n))[1]
        case.fit(cls(**params), model, tok, data)
    finally:
        torch.set_num_threads = original
        original(previous)
    assert counts and set(counts) == {1}, f"{owner}.fit set torch to {sorted(set(counts))} threads with threads=1"

    # the same parameters and seed learn the same, in a new analyser or fitting this one again
    again = case.fit(cls(**params), model, tok, data)
    assert_same(learned(again), learned(a), owner)
    first = learned(a)
    assert_same(learned(case.fit(a, model, tok, data)), first, owner)
    model.eval().requires_grad_(True)


def test_every_registered_analyser_is_checked():
    assert set(CASES) == set(ANALYSERS)
    assert analyser("moe") is MoEfier
    with pytest.raises(ConfigError, match="no analyser 'moefy'; analysers: moe, cluster, mask"):
        analyser("moefy")


@pytest.mark.parametrize("name", sorted(CASES))
def test_check_analyser(name, tiny):
    check_analyser(ANALYSERS[name], CASES[name], tiny)


def test_a_parameter_set_as_an_attribute_is_validated_and_reported():
    """The issue's case: `moe.top_k = 0` once skipped validation and left get_params stale."""
    moe = MoEfier(experts=4)
    moe.top_k = 0
    assert moe.get_params()["top_k"] == 0
    with pytest.raises(ConfigError, match=re.escape("The 'top_k' parameter of MoEfier must be an int in [1, experts]. "
                                                    "Got 0 instead.")):
        moe.fit("never/loaded", ["a text"])


def test_frozen_gives_back_modes_and_flags_when_the_block_fails():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1), torch.nn.Linear(2, 1))
    net.train()
    net[1].eval()
    net[2].weight.requires_grad_(False)
    with pytest.raises(RuntimeError), frozen(net):
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        raise RuntimeError
    assert [m.training for m in net] == [True, False, True] and net.training
    assert [p.requires_grad for p in net.parameters()] == [True, True, False, True]


# ------------------------------------------------------------------------------------------ the CLI


def test_every_table_parameter_is_an_option_of_its_command():
    ctx = click.Context(main)
    split = main.get_command(ctx, "split")
    for name, cls in ANALYSERS.items():
        options = {p.name: p for p in split.get_command(ctx, name).params}
        for p in cls.PARAMS:
            if not p.cli:
                assert p.name not in options
                continue
            option = options[p.name]
            assert option.opts == ["--" + p.name.replace("_", "-")] and option.help == p.help, p.name
            assert option.default == p.default or (option.default is None and p.default is None), p.name


def test_cli_types_convert_as_the_tables_declare(tiny, tmp_path, monkeypatch):
    from posthoc.analyse.cluster import run as cluster_run

    seen = {}

    def fake_split_cluster(model, out_dir, calib, **kwargs):
        seen.update(kwargs)
        raise ConfigError("stopped")

    monkeypatch.setattr(cluster_run, "split_cluster", fake_split_cluster)
    runner = CliRunner()
    base = ["split", "cluster", str(tiny["dir"]), str(tmp_path / "out"), "--quiet"]
    result = runner.invoke(main, [*base, "--layers", "0,1", "--edge-fraction", "0.5", "--no-ablate"])
    assert result.exit_code == 2 and "stopped" in result.output
    assert seen["layers"] == [0, 1] and seen["edge_fraction"] == 0.5 and seen["ablate"] is False
    assert seen["progress"] is False and seen["n_clusters"] == 8
    seen.clear()
    assert runner.invoke(main, base).exit_code == 2
    assert seen["layers"] is None and seen["edge_fraction"] == "auto"  # the table's defaults
    result = runner.invoke(main, [*base, "--layers", "0,x"])
    assert result.exit_code == 2 and "'0,x' is not a comma-separated list of FFN indices" in result.output
    result = runner.invoke(main, ["split", "mask", str(tiny["dir"]), str(tmp_path / "m"), "--task", "x",
                                  "--head", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "Directory" in result.output and "does not exist" in result.output
    assert INT_LIST.parse("") is None and INT_LIST.parse("3, 1") == [3, 1]


def test_split_moe_router_hidden(tiny, tmp_path):
    """`--router-hidden 32` (in the table, never settable from the CLI before): every MLP router is 32 wide."""
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(tiny["data"].texts))
    out = tmp_path / "moe"
    args = ["split", "moe", str(tiny["dir"]), str(out), "--calib", str(calib), "--experts", "4", "--top-k", "2",
            "--router-hidden", "32", "--router-epochs", "2", "--max-tokens", "1500", "--router-tokens", "600",
            "--no-report", "--quiet", "--threads", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    info = json.loads((out / "experts.json").read_text())
    assert info["params"]["router_hidden"] == 32
    assert [layer["routers"]["mlp"] for layer in info["layers"]] == [{"class": "MLPRouter", "hidden": 32}] * 2
    tensors = load_file(str(out / "experts.safetensors"))
    for i in range(2):
        assert tensors[f"{i}.router.mlp.first.weight"].shape == (32, 32)  # (hidden, d_model)
        assert tensors[f"{i}.router.mlp.second.weight"].shape == (4, 32)  # (experts, hidden)
    routers = [layer.router for layer in moe_layers(posthoc.load(out))]
    assert len(routers) == 2 and all(r.first.out_features == 32 and r.second.in_features == 32 for r in routers)
