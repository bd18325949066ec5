"""The data files recipes pass between steps: one JSON file per data set, written once, read by many steps.

    {"format": "posthoc-dataset", "name": ..., "label_names": [...],   # [] for unlabelled text
     "languages": [...] | null,                                         # set when texts are parallel
     "provenance": {...},
     "examples": [{"split": "train"|"validation"|"test", "label": int|null,
                   "text": str | {language: str}, "image": [ints] (optional), "group": str (optional)}]}

A classification data set becomes a `TextClassificationData` for one split (and one language, for
parallel text); everything else reads the examples directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posthoc.data import TextClassificationData
from posthoc.errors import DataError

FORMAT = "posthoc-dataset"
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Dataset:
    name: str
    label_names: tuple[str, ...]
    languages: tuple[str, ...] | None
    examples: tuple[dict[str, Any], ...]
    provenance: dict[str, Any]
    path: Path | None = None

    def part(self, split: str | None) -> list[dict[str, Any]]:
        if split is not None and split not in SPLITS:
            raise DataError(f"{self.name}: no split {split!r}; splits: {', '.join(SPLITS)}")
        return [e for e in self.examples if split is None or e["split"] == split]

    def texts(self, split: str | None = None, language: str | None = None) -> list[str]:
        return [self.text(e, language) for e in self.part(split)]

    def text(self, example: dict[str, Any], language: str | None) -> str:
        """An example's text; for parallel text, its text in `language` (which must be given)."""
        text = example["text"]
        if isinstance(text, dict):
            if language is None or language not in text:
                raise DataError(
                    f"{self.path or self.name}: texts are parallel in {', '.join(self.languages or text)}; "
                    f"name one of them as the language (got {language!r})"
                )
            return text[language]
        return text

    def classification(
        self, split: str, language: str | None = None, per_class: int | None = None
    ) -> TextClassificationData:
        """One split as labelled text (optionally the first `per_class` examples of each class)."""
        if not self.label_names:
            raise DataError(f"{self.path or self.name}: unlabelled text cannot train or score a classifier")
        part = self.part(split)
        if not part:
            raise DataError(f"{self.path or self.name}: the {split} split is empty")
        suffix = f"/{language}" if language else ""
        data = TextClassificationData(
            tuple(self.text(e, language) for e in part),
            tuple(int(e["label"]) for e in part),
            self.label_names,
            f"{self.name}{suffix}/{split}",
        )
        return data.limit_per_class(per_class)


def write_dataset(
    path: Path,
    examples: Sequence[dict[str, Any]],
    *,
    name: str,
    label_names: Sequence[str] = (),
    languages: Sequence[str] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write atomically (a temporary file renamed into place)."""
    bad = next((e for e in examples if e.get("split") not in SPLITS), None)
    if bad is not None:
        raise DataError(f"{name}: example with split {bad.get('split')!r}; splits: {', '.join(SPLITS)}")
    obj = {
        "format": FORMAT,
        "name": name,
        "label_names": list(label_names),
        "languages": list(languages) if languages else None,
        "provenance": provenance or {},
        "examples": list(examples),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_dataset(path: str | os.PathLike[str]) -> Dataset:
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not a readable data set ({error})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise DataError(f"{path}: not a posthoc data set (written by a recipe's `data` step)")
    languages = tuple(obj["languages"]) if obj.get("languages") else None
    return Dataset(
        obj["name"], tuple(obj["label_names"]), languages, tuple(obj["examples"]), obj.get("provenance", {}), path
    )


def hash_split(key: str, validation: float, test: float, seed: int = 0) -> str:
    """A split decided by a hash of the example's key: stable across machines, runs and added examples."""
    value = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64
    if value < test:
        return "test"
    if value < test + validation:
        return "validation"
    return "train"
