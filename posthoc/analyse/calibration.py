"""Calibration data: where the texts come from, and how they become token batches.

Every analyser (MoE-fication, clustering, masks) looks at a model through its activations on some text.
`load_calibration(spec)` reads that text from one of

    PATH.txt                 paragraphs (blank-line separated; one text per line if there are none)
    PATH.jsonl               one JSON object per line; the text column is `text_column` or the first of
                             text / content / sentence / document; `label` (int or str) if present
    PATH.csv                 a header row, the same column rules
    DIR                      every .txt / .jsonl / .csv file below it, sorted
    folders:DIR              DIR/<class>/<doc>.txt, labelled by folder (like the BBC corpus)
    bbc[:train|validation|test]
                             the packaged BBC News corpus (labelled), optionally one part of the seeded
                             stratified split posthoc uses everywhere (seed 0, 70/10/20)
    hf:NAME[@CONFIG][:SPLIT[:COLUMN]]
                             a Hugging Face `datasets` dataset (needs the hub: online only)

and `token_batches` streams it through a tokenizer: encoders get one text per sequence (truncated,
padded, labels kept), decoders get the texts concatenated and cut into full-length sequences (no padding
to waste compute on).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posthoc.data import load_bbc, read_text_folders, stratified_split
from posthoc.errors import DataError

TEXT_COLUMNS = ("text", "content", "sentence", "document")
BBC_PARTS = ("train", "validation", "test")


@dataclass(frozen=True)
class CalibrationData:
    """Texts, optionally labelled (`labels[i]` indexes `label_names`); `name` says where they came from."""

    texts: tuple[str, ...]
    labels: tuple[int, ...] | None = None
    label_names: tuple[str, ...] = ()
    name: str = "calibration"

    def __len__(self) -> int:
        return len(self.texts)

    def __add__(self, other: CalibrationData) -> CalibrationData:
        labelled = self.labels is not None and other.labels is not None and self.label_names == other.label_names
        return CalibrationData(
            self.texts + other.texts,
            (self.labels + other.labels) if labelled else None,  # type: ignore[operator]
            self.label_names if labelled else (),
            f"{self.name}+{other.name}",
        )

    def select(self, indices: Sequence[int], name: str | None = None) -> CalibrationData:
        return CalibrationData(
            tuple(self.texts[i] for i in indices),
            None if self.labels is None else tuple(self.labels[i] for i in indices),
            self.label_names,
            name or self.name,
        )

    def split(self, held_out: float, seed: int = 0) -> tuple[CalibrationData, CalibrationData]:
        """(calibration part, held-out part): a seeded shuffle, the last `held_out` fraction held out."""
        if not 0 < held_out < 1:
            raise DataError(f"held-out fraction must be in (0, 1), got {held_out}")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        n_out = max(1, round(len(self) * held_out))
        if n_out >= len(self):
            raise DataError(
                f"calibration data {self.name}: {len(self)} text(s) are too few to hold {held_out:.0%} out for "
                "evaluation; give more text, or held-out text separately (--eval)"
            )
        return self.select(order[:-n_out], f"{self.name}/calib"), self.select(order[-n_out:], f"{self.name}/held-out")

    @classmethod
    def of(cls, data: Any, name: str = "texts") -> CalibrationData:
        """Accept a CalibrationData, a TextClassificationData, a spec string / path, or a list of strings."""
        if isinstance(data, CalibrationData):
            return data
        if hasattr(data, "texts") and hasattr(data, "labels") and hasattr(data, "label_names"):
            return cls(tuple(data.texts), tuple(data.labels), tuple(data.label_names), getattr(data, "name", name))
        if isinstance(data, (str, os.PathLike)):
            return load_calibration(data)
        if isinstance(data, Sequence) and all(isinstance(t, str) for t in data):
            return cls(tuple(data), name=name)
        raise DataError(f"calibration data must be texts, a file or a spec, got {type(data).__name__}")


def load_calibration(
    spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    text_column: str | None = None,
    label_column: str | None = "label",
    max_texts: int | None = None,
) -> CalibrationData:
    """Read calibration texts from a spec (see the module docstring); several specs are concatenated."""
    if not isinstance(spec, (str, os.PathLike)):
        parts = [load_calibration(s, text_column=text_column, label_column=label_column) for s in spec]
        if not parts:
            raise DataError("no calibration data given; pass --calib with a file, a directory, 'bbc' or hf:NAME")
        data = parts[0]
        for part in parts[1:]:
            data = data + part
    else:
        data = _load_one(str(spec), text_column, label_column)
    texts = [t for t in data.texts if t.strip()]
    if not texts:
        raise DataError(f"calibration data {data.name!r} holds no text")
    if len(texts) != len(data.texts):
        keep = [i for i, t in enumerate(data.texts) if t.strip()]
        data = data.select(keep)
    if max_texts is not None:
        data = data.select(range(min(max_texts, len(data))))
    return data


def _load_one(spec: str, text_column: str | None, label_column: str | None) -> CalibrationData:
    path = Path(spec).expanduser()
    if spec.startswith("folders:"):
        return CalibrationData.of(read_text_folders(spec[len("folders:") :]))
    if spec == "bbc" or spec.startswith("bbc:"):
        return _bbc(spec)
    if spec.startswith("hf:"):
        return _hub(spec[3:], text_column)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl", ".csv"))
        if not files:
            raise DataError(f"{path}: no .txt, .jsonl or .csv files below this directory")
        data = _file(files[0], text_column, label_column)
        for file in files[1:]:
            data = data + _file(file, text_column, label_column)
        return CalibrationData(data.texts, data.labels, data.label_names, str(path))
    if path.is_file():
        return _file(path, text_column, label_column)
    if path.suffix in (".txt", ".jsonl", ".csv") or spec.startswith((".", "/", "~")):
        raise DataError(f"{spec}: no such calibration file or directory")
    return _hub(spec, text_column, local_hint=True)


def _file(path: Path, text_column: str | None, label_column: str | None) -> CalibrationData:
    try:
        raw = path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error})") from None
    if path.suffix == ".txt":
        paragraphs = [p.strip() for p in raw.replace("\r\n", "\n").split("\n\n")]
        if len(paragraphs) <= 1:
            paragraphs = [line.strip() for line in raw.splitlines()]
        return CalibrationData(tuple(p for p in paragraphs if p), name=str(path))
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{n}: not valid JSON ({error})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: each line must be a JSON object with a text field")
            rows.append(row)
    elif path.suffix == ".csv":
        rows = list(csv.DictReader(raw.splitlines()))
    else:
        raise DataError(f"{path}: calibration files must be .txt, .jsonl or .csv")
    return _rows(rows, str(path), text_column, label_column)


def _rows(rows: list[dict[str, Any]], where: str, text_column: str | None, label_column: str | None) -> CalibrationData:
    if not rows:
        return CalibrationData((), name=where)
    columns = list(rows[0])
    column = text_column or next((c for c in TEXT_COLUMNS if c in columns), None)
    if column is None or column not in columns:
        raise DataError(
            f"{where}: no text column {'named ' + repr(text_column) if text_column else 'found'}; "
            f"columns are {columns}; name one with --text-column"
        )
    texts = tuple(str(r.get(column) or "") for r in rows)
    labels: tuple[int, ...] | None = None
    names: tuple[str, ...] = ()
    if label_column and all(label_column in r and r[label_column] not in (None, "") for r in rows):
        values = [r[label_column] for r in rows]
        if all(isinstance(v, int) for v in values):
            names = tuple(str(i) for i in range(max(values) + 1))
            labels = tuple(values)
        else:
            names = tuple(sorted({str(v) for v in values}))
            labels = tuple(names.index(str(v)) for v in values)
    return CalibrationData(texts, labels, names, where)


def _bbc(spec: str) -> CalibrationData:
    part = spec.partition(":")[2]
    data = load_bbc()
    if part:
        if part not in BBC_PARTS:
            raise DataError(f"calibration spec {spec!r}: the BBC part must be one of {', '.join(BBC_PARTS)}")
        data = getattr(stratified_split(data), part)
    return CalibrationData(data.texts, data.labels, data.label_names, f"bbc:{part or 'all'}")


def _hub(spec: str, text_column: str | None, local_hint: bool = False) -> CalibrationData:
    """NAME[@CONFIG][:SPLIT[:COLUMN]] through `datasets` (downloaded when online)."""
    name, _, rest = spec.partition(":")
    split, _, column = rest.partition(":")
    name, _, config = name.partition("@")
    column = column or text_column
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ) not in ("0", "", "false", "False")
    hint = ("it is not a local file or directory either; " if local_hint else "") + "pass local .txt/.jsonl/.csv files, a directory, or 'bbc' (the packaged BBC News corpus) instead"
    if offline:
        raise DataError(
            f"calibration data 'hf:{spec}' is a Hugging Face dataset, but the hub is switched off "
            f"(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); {hint}"
        )
    try:
        import datasets

        dataset = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as error:  # datasets raises many types (connection, missing, bad config)
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise DataError(f"calibration data 'hf:{spec}': cannot load it from the hub ({first}); {hint}") from None
    columns = list(dataset.column_names)
    column = column or next((c for c in TEXT_COLUMNS if c in columns), None)
    if column not in columns:
        raise DataError(f"calibration data 'hf:{spec}': no text column; columns are {columns}; give NAME:SPLIT:COLUMN")
    return CalibrationData(tuple(str(t) for t in dataset[column]), name=f"hf:{spec}")


# ------------------------------------------------------------------------------------------ batching


@dataclass
class TokenBatch:
    """One forward pass worth of tokens. `attention_mask` marks real tokens; `labels` are per sequence."""

    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask (+ token_type_ids): (batch, length)
    labels: torch.Tensor | None  # (batch,) long, or None

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.inputs["attention_mask"]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def token_labels(self) -> torch.Tensor | None:
        """The label of every real token, flattened in the order hooks see tokens: (tokens,)."""
        if self.labels is None:
            return None
        mask = self.attention_mask.bool()
        return self.labels[:, None].expand_as(mask)[mask]


def token_batches(
    tokenizer: Any,
    data: CalibrationData,
    *,
    max_length: int = 128,
    batch_size: int = 16,
    pack: bool = False,
    max_tokens: int | None = None,
) -> Iterator[TokenBatch]:
    """Tokenise `data` and yield batches until the data or `max_tokens` real tokens run out.

    pack=False: one text per sequence, truncated to `max_length`, sorted by length within a window of
    batches (little padding), labels kept. pack=True: texts joined (separated by the EOS token) and cut
    into sequences of exactly `max_length` tokens; labels are dropped. The last batch is cut so that no
    more than `max_tokens` tokens are yielded in all.
    """
    if max_length < 2:
        raise DataError(f"max_length must be at least 2 tokens, got {max_length}")
    budget = max_tokens if max_tokens is not None else float("inf")
    if pack:
        yield from _packed(tokenizer, data, max_length, batch_size, budget)
        return
    window = batch_size * 16
    for start in range(0, len(data), window):
        texts = list(data.texts[start : start + window])
        encoded = tokenizer(texts, truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
        order = sorted(range(len(texts)), key=lambda i: -len(encoded["input_ids"][i]))
        for b in range(0, len(order), batch_size):
            if budget <= 0:
                return
            rows = order[b : b + batch_size]
            lengths = [len(encoded["input_ids"][i]) for i in rows]
            # cut the batch so the token budget is met exactly (fewer or shorter sequences)
            kept, total = [], 0
            for i, n in zip(rows, lengths):
                if total >= budget:
                    break
                kept.append((i, int(min(n, budget - total))))
                total += kept[-1][1]
            features = [{k: encoded[k][i][:n] for k in keys} for i, n in kept]
            padded = tokenizer.pad(features, return_tensors="pt")
            inputs = {k: padded[k] for k in keys if k in padded}
            if "attention_mask" not in inputs:
                inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            labels = None if data.labels is None else torch.tensor([data.labels[start + i] for i, _ in kept])
            budget -= total
            yield TokenBatch(inputs, labels)


def _packed(tokenizer: Any, data: CalibrationData, length: int, batch_size: int, budget: float) -> Iterator[TokenBatch]:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    buffer: list[int] = []
    rows: list[list[int]] = []
    for start in range(0, len(data), 64):
        for ids in tokenizer(list(data.texts[start : start + 64]), add_special_tokens=False)["input_ids"]:
            buffer.extend(ids + ([eos] if eos is not None else []))
            while len(buffer) >= length:
                rows.append(buffer[:length])
                buffer = buffer[length:]
                if len(rows) == batch_size:
                    batch, budget = _rows_batch(rows, budget)
                    rows = []
                    if batch is not None:
                        yield batch
                    if budget <= 0:
                        return
    if buffer and len(buffer) >= 2:
        rows.append(buffer)
    while rows and budget > 0:
        same = [r for r in rows if len(r) == len(rows[0])]
        rows = [r for r in rows if len(r) != len(rows[0])]
        batch, budget = _rows_batch(same, budget)
        if batch is not None:
            yield batch


def _rows_batch(rows: list[list[int]], budget: float) -> tuple[TokenBatch | None, float]:
    length = len(rows[0])
    n_rows = int(min(len(rows), max(0, budget) // length))
    if n_rows == 0 and budget >= 2:  # the budget ends inside one sequence: a shorter last one
        ids = torch.tensor([rows[0][: int(budget)]])
    elif n_rows == 0:
        return None, 0
    else:
        ids = torch.tensor(rows[:n_rows])
    return TokenBatch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None), budget - ids.numel()


def is_causal_lm(model: Any) -> bool:
    """Whether a model predicts next tokens (decoders get packed batches and perplexity)."""
    config = getattr(model, "config", None)
    archs = getattr(config, "architectures", None) or []
    return bool(getattr(config, "is_decoder", False)) or any(a.endswith("ForCausalLM") for a in archs) or type(
        model
    ).__name__.endswith("ForCausalLM")
