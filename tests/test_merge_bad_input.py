"""Bad input: one clear line naming the culprit, exit status ≠ 0, nothing written, inputs untouched."""

from __future__ import annotations

import io
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from bad_input import refused
from click.testing import CliRunner
from conftest import private_copy, tree_digest
from posthoc.cli import main
from safetensors.torch import load_file, save_file


@pytest.fixture()
def family(llama_family, tmp_path) -> tuple[Path, list[Path]]:
    """A private copy of the tiny Llama family that a test may damage."""
    return private_copy(*llama_family, tmp_path)


def fails_cleanly(tmp_path: Path, args: list, inputs: list[Path], *, match: str) -> str:
    return refused(args, inputs, tmp_path, match=match)


def config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def ties(base, models, **params):
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}} for m in models],
        **({"parameters": params} if params else {}),
    }


def damage(path: Path, name: str, fn) -> None:
    tensors = load_file(path / "model.safetensors")
    result = fn(tensors[name])
    if result is None:
        del tensors[name]
    else:
        tensors[name] = result
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_shapes_that_differ(family, tmp_path):
    base, tuned = family
    damage(tuned[1], "model.layers.1.mlp.up_proj.weight", lambda t: t[:-1].clone())
    message = fails_cleanly(tmp_path, ["merge", config(tmp_path, ties(base, tuned)), tmp_path / "out"], [base, *tuned],
                            match="model.layers.1.mlp.up_proj.weight")
    assert "[64, 32]" in message and "[63, 32]" in message


def test_tensor_missing_in_one_model(family, tmp_path):
    base, tuned = family
    damage(tuned[0], "model.norm.weight", lambda t: None)
    fails_cleanly(tmp_path, ["merge", config(tmp_path, ties(base, tuned)), tmp_path / "out"], [base, *tuned],
                  match="tensor model.norm.weight is missing in")


def test_different_vocabulary_sizes(family, tmp_path):
    base, tuned = family
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        damage(tuned[2], name, lambda t: torch.cat([t, t[:2]]))
    message = fails_cleanly(tmp_path, ["merge", config(tmp_path, ties(base, tuned)), tmp_path / "out"], [base, *tuned],
                            match="vocabulary sizes differ")
    assert "64 rows" in message and "66" in message and "tokenizer" in message


def test_truncated_safetensors(family, tmp_path):
    base, tuned = family
    file = tuned[0] / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    fails_cleanly(tmp_path, ["merge", config(tmp_path, ties(base, tuned)), tmp_path / "out"], [base, *tuned],
                  match=f"{file}: not a valid safetensors file")


def test_corrupt_safetensors_header(family, tmp_path):
    base, tuned = family
    file = tuned[1] / "model.safetensors"
    raw = bytearray(file.read_bytes())
    raw[8:20] = b"\x00garbage!!\xff\xfe"
    file.write_bytes(bytes(raw))
    fails_cleanly(tmp_path, ["merge", config(tmp_path, ties(base, tuned)), tmp_path / "out"], [base, *tuned],
                  match="not a valid safetensors file")


def test_nan_in_output(family, tmp_path):
    base, tuned = family
    damage(tuned[0], "model.layers.0.self_attn.o_proj.weight", lambda t: t.index_fill(0, torch.tensor([3]), float("nan")))
    message = fails_cleanly(tmp_path, ["merge", config(tmp_path, ties(base, tuned)), tmp_path / "out"], [base, *tuned],
                            match="tensor model.layers.0.self_attn.o_proj.weight: ties produced NaN/Inf")
    assert str(tuned[0]) in message


def test_weights_summing_to_zero_make_inf(family, tmp_path):
    base, tuned = family
    data = {"merge_method": "linear", "models": [{"model": str(base), "parameters": {"weight": 1.0}},
                                                 {"model": str(tuned[0]), "parameters": {"weight": -1.0}}]}
    fails_cleanly(tmp_path, ["merge", config(tmp_path, data), tmp_path / "out"], [base, *tuned],
                  match="weights that sum to zero")


def test_unknown_method_lists_valid(family, tmp_path):
    base, tuned = family
    data = ties(base, tuned) | {"merge_method": "tie"}
    fails_cleanly(tmp_path, ["merge", config(tmp_path, data), tmp_path / "out"], [base], match="valid methods: ")


def test_unknown_parameter_lists_valid(family, tmp_path):
    base, tuned = family
    message = fails_cleanly(tmp_path, ["merge", config(tmp_path, ties(base, tuned, densty=0.3)), tmp_path / "out"],
                            [base], match="no parameter 'densty'")
    assert "valid parameters: weight, density" in message


def test_global_parameter_given_per_model(family, tmp_path):
    base, tuned = family
    data = ties(base, tuned)
    data["models"][0]["parameters"]["lambda"] = 2
    fails_cleanly(tmp_path, ["merge", config(tmp_path, data), tmp_path / "out"], [base], match="'lambda' of ties is global")


def test_slerp_needs_exactly_two_models(family, tmp_path):
    base, tuned = family
    fails_cleanly(tmp_path, ["merge", "--method", "slerp", "--base", base, *tuned[:2], "--t", "0.5", "-o", tmp_path / "out"],
                  [base], match="slerp merges exactly two models")


def test_model_stock_needs_three(family, tmp_path):
    base, tuned = family
    fails_cleanly(tmp_path, ["merge", "--method", "model_stock", "--base", base, tuned[0], "-o", tmp_path / "out"],
                  [base], match="three models")


@pytest.mark.parametrize("density", [0, -0.1, 1.5])
def test_density_outside_unit_interval(family, tmp_path, density):
    base, tuned = family
    fails_cleanly(tmp_path, ["merge", "--method", "ties", "--base", base, *tuned, "--density", density, "-o", tmp_path / "out"],
                  [base], match="must be a number in (0, 1]")


def test_output_exists(family, tmp_path):
    base, tuned = family
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    fails_cleanly(tmp_path, ["merge", config(tmp_path, ties(base, tuned)), tmp_path / "out"], [base], match="--force")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_output_inside_an_input(family, tmp_path):
    base, tuned = family
    before = tree_digest(base)
    result = CliRunner().invoke(main, ["merge", str(config(tmp_path, ties(base, tuned))), str(base / "merged"), "--force"])
    assert result.exit_code == 2 and "is inside the input" in result.stderr
    assert tree_digest(base) == before and not (base / "merged").exists()


class _RunsCode:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_bin_whose_pickle_would_run_code(family, tmp_path, monkeypatch):
    base, tuned = family
    evil = tmp_path / "evil"
    shutil.copytree(tuned[0], evil)
    (evil / "model.safetensors").unlink()
    state = {k: v for k, v in load_file(tuned[0] / "model.safetensors").items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    # Rewrite the pickle inside the zip so that loading it would call exec().
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    with zipfile.ZipFile(evil / "pytorch_model.bin", "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith("data.pkl"):
                data = pickle.dumps(_RunsCode(), protocol=2)
            target.writestr(item, data)
    monkeypatch.chdir(tmp_path)
    fails_cleanly(tmp_path, ["merge", config(tmp_path, ties(base, [evil, tuned[1]])), tmp_path / "out"], [base, evil],
                  match="refused to unpickle")
    assert not (tmp_path / "PWNED").exists()


def test_bin_checkpoint_with_plain_tensors_is_read(family, tmp_path):
    base, tuned = family
    plain = tmp_path / "plain"
    shutil.copytree(tuned[0], plain)
    torch.save(load_file(plain / "model.safetensors"), plain / "pytorch_model.bin")
    (plain / "model.safetensors").unlink()
    result = CliRunner().invoke(main, ["merge", str(config(tmp_path, ties(base, [plain, tuned[1]]))), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output


def test_failure_midway_leaves_nothing(family, tmp_path, monkeypatch):
    import dataclasses

    from posthoc.merge.registry import REGISTRY

    base, tuned = family
    calls = {"n": 0}
    original = REGISTRY["linear"].fn

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setitem(REGISTRY, "linear", dataclasses.replace(REGISTRY["linear"], fn=failing))
    result = CliRunner().invoke(main, ["merge", "--method", "linear", str(base), str(tuned[0]), "-o", str(tmp_path / "out")])
    assert result.exit_code == 130 and "nothing was written" in result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.posthoc-*"))


def test_hub_id_offline_is_one_clear_line(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot reach the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    fails_cleanly(tmp_path, ["check", "someorg/somemodel"], [], match="someorg/somemodel: not a local path, and the Hugging Face hub cannot be reached")


def test_hub_id_online_downloads_through_huggingface_hub(llama_family, tmp_path, monkeypatch):
    import huggingface_hub

    base, _ = llama_family
    calls = []

    def fake_snapshot(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, tuple(allow_patterns)))
        return str(base)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    result = CliRunner().invoke(main, ["check", "someorg/somemodel"])
    assert result.exit_code == 0 and "someorg/somemodel" in result.output
    assert calls[0][0] == "someorg/somemodel" and "*.safetensors" in calls[0][1]


def test_killed_run_leaves_only_a_hidden_staging_dir_that_the_next_run_removes(family, tmp_path):
    """SIGKILL cannot be caught: the target never appears, and the next write cleans the dead run's files."""
    import os
    import signal
    import subprocess
    import sys
    import time

    base, tuned = family
    code = (
        "import time, torch\n"
        "from posthoc.checkpoint import CheckpointWriter, TensorSpec\n"
        f"w = CheckpointWriter({str(tmp_path / 'out')!r}, [TensorSpec('a', (4,), torch.float32)])\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    time.sleep(0.1)
    assert not (tmp_path / "out").exists()
    assert len(list(tmp_path.glob(".out.posthoc-tmp-*"))) == 1
    result = CliRunner().invoke(main, ["merge", str(config(tmp_path, ties(base, tuned))), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert not list(tmp_path.glob(".out.posthoc-tmp-*"))


def test_hub_id_with_revision(llama_family, tmp_path, monkeypatch):
    import huggingface_hub

    base, _ = llama_family
    calls = []

    def fake_snapshot(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision))
        return str(base)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    result = CliRunner().invoke(main, ["check", "someorg/somemodel@v1.0"])
    assert result.exit_code == 0, result.output
    assert calls[0] == ("someorg/somemodel", "v1.0")
