"""Shared pieces of the module tests: tiny base/fine-tune families and independent readers of the outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import private_copy, read_all, tiny_bert_config, tiny_llama_config


def make_pair(root: Path, model_cls, config, n_tuned: int = 2, seed: int = 0) -> tuple[Path, list[Path]]:
    """A base and `n_tuned` fine-tunes whose matrices change by a rank-3 term plus a little full-rank noise,
    and whose norms and biases change too (what real fine-tunes do); saved with transformers."""
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.save_pretrained(root / "base")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    paths = []
    for i in range(n_tuned):
        g = torch.Generator().manual_seed(1000 + 17 * i + seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                b = base_state[name]
                if p.dim() == 2:
                    low = torch.randn(p.shape[0], 3, generator=g) @ torch.randn(3, p.shape[1], generator=g)
                    change = 0.02 * low + 0.002 * torch.randn(p.shape, generator=g)
                else:
                    change = 0.01 * torch.randn(p.shape, generator=g)
                p.copy_(b + change)
        model.save_pretrained(root / f"tuned{i}")
        paths.append(root / f"tuned{i}")
    return root / "base", paths


@pytest.fixture(scope="session")
def bert_pair(tmp_path_factory) -> tuple[Path, list[Path]]:
    from transformers import BertModel

    return make_pair(tmp_path_factory.mktemp("mod_bert"), BertModel, tiny_bert_config(vocab_size=100))


@pytest.fixture(scope="session")
def llama_tied_pair(tmp_path_factory) -> tuple[Path, list[Path]]:
    from transformers import LlamaForCausalLM

    return make_pair(tmp_path_factory.mktemp("mod_llama"), LlamaForCausalLM, tiny_llama_config(tie=True), n_tuned=1)


@pytest.fixture()
def bert_copy(bert_pair, tmp_path) -> tuple[Path, list[Path]]:
    """A private copy a test may damage."""
    return private_copy(*bert_pair, tmp_path)


def changes(base: Path, tuned: Path) -> dict[str, torch.Tensor]:
    """φ = tuned − base for every float tensor, read with the safetensors library (not through posthoc)."""
    b, t = read_all(base), read_all(tuned)
    return {n: (t[n].double() - b[n].double()) for n in b if b[n].dtype.is_floating_point}


def lora_changes(directory: Path) -> dict[str, torch.Tensor]:
    """φ of every LoRA factor pair of an adapter directory, from PEFT's own conventions (scaling α/r)."""
    import json

    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = read_all(directory)
    out = {}
    for key in tensors:
        if key.endswith("lora_A.weight"):
            module = key[len("base_model.model."):-len(".lora_A.weight")]
            a, b = tensors[key].double(), tensors[key.replace("lora_A", "lora_B")].double()
            r = a.shape[0]
            alpha = config["alpha_pattern"].get(module, config["lora_alpha"])
            out[f"{module}.weight"] = (alpha / r) * (b @ a)
        elif key.endswith("lora_embedding_A"):
            module = key[len("base_model.model."):-len(".lora_embedding_A")]
            a, b = tensors[key].double(), tensors[key.replace("_A", "_B")].double()
            r = a.shape[0]
            alpha = config["alpha_pattern"].get(module, config["lora_alpha"])
            out[f"{module}.weight"] = (alpha / r) * (b @ a).T
    return out


def best_rank(phi: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(phi.double(), full_matrices=False)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank]


def outputs(model_dir: Path, peft_dir: Path | None = None, causal: bool = False, seed: int = 0) -> torch.Tensor:
    """Final hidden states (or logits) of a checkpoint, or of base + PEFT adapter loaded by PEFT itself."""
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if causal else AutoModel
    model = cls.from_pretrained(model_dir)
    if peft_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, peft_dir)
    model.eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if causal else out.last_hidden_state


def fails_cleanly(tmp_path: Path, args: list, inputs: list[Path], *, match: str, out: Path | None = None) -> str:
    """The shared clean-refusal check (tests/bad_input.py) below `tmp_path`."""
    from bad_input import refused

    return refused(args, inputs, tmp_path, match=match)
