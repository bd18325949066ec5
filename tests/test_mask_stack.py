"""Mask modules (clusters, subnetworks) through the module ecosystem: `posthoc stack` applies them after the
additive modules, `posthoc.load` loads a base with one applied; both against the weights zeroed by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from posthoc.cli import main
from tiny_text import make_tiny_bert

import posthoc
from posthoc.checkpoint import open_checkpoint, save_state_dict
from posthoc.errors import ConfigError
from posthoc.ffn import find_ffns
from posthoc.modules.apply import stack
from posthoc.modules.masks import neuron_entries, neuron_mask_name, write_mask_module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("maskstack") / "base")


@pytest.fixture(scope="module")
def cluster(tiny, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A neuron mask module over FFN 1 marking neurons 0..9 (a 'cluster')."""
    from posthoc.models import load_model

    model, _, _ = load_model(tiny)
    ffn = find_ffns(model)[1]
    member = torch.zeros(64, dtype=torch.bool)
    member[:10] = True
    with open_checkpoint(tiny) as base:
        module = write_mask_module(tmp_path_factory.mktemp("maskstack") / "cluster", base,
                                   {neuron_mask_name(1): member}, neuron_entries(ffn, base), tags={"ones": "member"})
    return module, member


def _expected(tiny: Path, member: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
    keep = member if mode == "keep" else ~member
    with open_checkpoint(tiny) as base:
        state = {name: base.read(name) for name in base}
    state["encoder.layer.1.intermediate.dense.weight"] = state["encoder.layer.1.intermediate.dense.weight"] * keep[:, None]
    state["encoder.layer.1.intermediate.dense.bias"] = state["encoder.layer.1.intermediate.dense.bias"] * keep
    state["encoder.layer.1.output.dense.weight"] = state["encoder.layer.1.output.dense.weight"] * keep[None, :]
    return state


@pytest.mark.parametrize("mode", ["keep", "remove"])
def test_stack_applies_a_mask_module_and_load_gives_the_same_model(tiny, cluster, mode, tmp_path):
    module, member = cluster
    result = CliRunner().invoke(main, ["stack", str(tiny), str(tmp_path / "out"), "--module", str(module),
                                       "--mask-mode", mode, "--quiet"])
    assert result.exit_code == 0, result.output
    expected = _expected(tiny, member, mode)
    with open_checkpoint(tmp_path / "out") as out:
        assert set(out.tensors) == set(expected)
        for name, value in expected.items():
            assert torch.equal(out.read(name), value), name
    loaded = posthoc.load(module, mode=mode)  # the base named in the manifest, mask applied in memory
    for name, value in loaded.state_dict().items():
        if name in expected:
            assert torch.equal(value, expected[name]), name


def test_stack_adds_deltas_then_masks(tiny, cluster, tmp_path):
    """θ = M ⊙ (θ₀ + φ): a delta module on the same tensor is added before the mask zeroes."""
    from posthoc.modules.extraction import extract

    module, member = cluster
    with open_checkpoint(tiny) as base:
        state = {name: base.read(name) for name in base}
    name = "encoder.layer.1.output.dense.weight"
    tuned = dict(state)
    tuned[name] = state[name] + 1.0
    save_state_dict(tuned, tmp_path / "tuned", config=open_checkpoint(tiny).config, copy_from=tiny)
    extract(tiny, tmp_path / "tuned", tmp_path / "delta", kind="delta", progress=False)
    delta = tmp_path / "delta"
    stack(tiny, [delta, module], tmp_path / "out", progress=False)
    with open_checkpoint(tmp_path / "out") as out:
        assert torch.allclose(out.read(name), (state[name] + 1.0) * member[None, :])


def test_mask_modules_refused_where_they_make_no_sense(tiny, cluster, tmp_path):
    module, _ = cluster
    with pytest.raises(ConfigError, match="cannot be summed into a module"):
        stack(tiny, [module], tmp_path / "x", as_module=True, progress=False)
    with pytest.raises(ConfigError, match="takes no --scale"):
        stack(tiny, [module], tmp_path / "x", scales=[0.5], progress=False)
    assert not (tmp_path / "x").exists()
