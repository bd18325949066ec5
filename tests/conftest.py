"""Shared fixtures: tiny random Llama and BERT checkpoints built from configs, and helpers to inspect outputs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from bad_input import tree_digest  # noqa: F401  (its home is bad_input; older tests import it from here)
from safetensors import safe_open

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_llama_config(vocab_size: int = 64, tie: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )


def tiny_bert_config(vocab_size: int = 30522):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )


def make_family(root: Path, model_cls, config, n_tuned: int, dtype=torch.float32, noise: float = 0.02, **save_kwargs):
    """A base model and `n_tuned` 'fine-tunes' (base + independent noise), saved with transformers."""
    torch.manual_seed(0)
    model = model_cls(config).to(dtype).eval()
    model.save_pretrained(root / "base", **save_kwargs)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    paths = []
    for i in range(n_tuned):
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base_state[name] + noise * torch.randn(p.shape, generator=generator).to(dtype))
        model.save_pretrained(root / f"tuned{i}", **save_kwargs)
        paths.append(root / f"tuned{i}")
    return root / "base", paths


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    from transformers import LlamaForCausalLM

    return make_family(tmp_path_factory.mktemp("llama"), LlamaForCausalLM, tiny_llama_config(), 3)


@pytest.fixture(scope="session")
def llama_family_sharded_bf16(tmp_path_factory) -> tuple[Path, list[Path]]:
    from transformers import LlamaForCausalLM

    return make_family(
        tmp_path_factory.mktemp("llama_sharded"),
        LlamaForCausalLM,
        tiny_llama_config(),
        3,
        dtype=torch.bfloat16,
        max_shard_size="10KB",
    )


@pytest.fixture(scope="session")
def bert_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    from transformers import BertModel

    return make_family(tmp_path_factory.mktemp("bert"), BertModel, tiny_bert_config(vocab_size=100), 2)


def private_copy(base: Path, tuned: list[Path], root: Path) -> tuple[Path, list[Path]]:
    """A copy of a model family under `root` that a test may damage."""
    shutil.copytree(base, root / "base")
    for p in tuned:
        shutil.copytree(p, root / p.name)
    return root / "base", [root / p.name for p in tuned]


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a written checkpoint, through the safetensors library (not through posthoc)."""
    tensors = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensors[name] = f.get_tensor(name)
    return tensors

