"""Tiny random models *with tokenizers* for the analyser tests: a Llama (SwiGLU) and an OPT (ReLU FFN that
posthoc does not recognise), sharing the WordPiece-free word vocabulary of `tiny_text`."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_text import VOCAB


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="[SEP]",
                                   bos_token="[CLS]")


def make_tiny_llama(directory: Path, seed: int = 0, intermediate_size: int = 64) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=intermediate_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, architectures=["LlamaForCausalLM"],
                         pad_token_id=0, eos_token_id=3, bos_token_id=2)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    return directory


def make_tiny_opt(directory: Path, seed: int = 0) -> Path:
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=len(VOCAB), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=128, word_embed_proj_dim=32, architectures=["OPTForCausalLM"],
                       pad_token_id=0, eos_token_id=3, bos_token_id=2)
    torch.manual_seed(seed)
    OPTForCausalLM(config).eval().save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    return directory


OPT_FFN_MODULES = "up=model.decoder.layers.*.fc1,down=model.decoder.layers.*.fc2,act=relu"


def amplified_copy(model_dir: Path, out: Path) -> Path:
    """A copy of a tiny BERT with its FFNs scaled up (a random one hardly uses them, MoE and dense differ by
    ~1e-4): MoE-fication then loses something healing can win back."""
    from posthoc.models import load_model

    model, tok, _ = load_model(model_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "intermediate.dense" in name:
                p.mul_(3)
            if "output.dense" in name and "attention" not in name:
                p.mul_(8)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
