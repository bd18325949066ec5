"""Compatibility report of several checkpoints, computed from headers and configs only (no tensor data).

`posthoc check` prints it; `posthoc merge` runs it first and refuses to write anything when it finds a
problem. Problems name the exact tensor, the models and both sizes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from posthoc.checkpoint import Checkpoint

LAYER_INDEX = re.compile(r"\.(\d+)\.")
EMBEDDING_HINTS = ("embed_tokens", "word_embeddings", "wte", "lm_head", "embed_out", "shared", "output.weight")


@dataclass
class ModelSummary:
    source: str
    architecture: str | None
    num_tensors: int
    num_parameters: int
    dtypes: dict[str, int]
    vocab_rows: int | None  # rows of the input embedding matrix
    tokenizer_size: int | None
    tied_embeddings: bool | None


@dataclass
class CompatReport:
    models: list[ModelSummary]
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    vocab_problems: list[str] = field(default_factory=list)  # the problems that an aligned vocabulary solves

    @property
    def vocab_mismatch(self) -> bool:
        return bool(self.vocab_problems)

    @property
    def ok(self) -> bool:
        return not self.problems

    def vocabulary_aligned(self) -> None:
        """The vocabularies are merged over one tokenizer: their size differences are no longer problems."""
        self.problems = [p for p in self.problems if p not in self.vocab_problems]

    def render(self) -> str:
        lines = []
        for m in self.models:
            dtypes = ", ".join(f"{k} x{v}" for k, v in sorted(m.dtypes.items()))
            tied = {True: "tied", False: "untied", None: "n/a"}[m.tied_embeddings]
            lines.append(
                f"{m.source}\n  architecture {m.architecture}; {m.num_tensors} tensors, "
                f"{m.num_parameters / 1e6:.1f} M parameters ({dtypes})\n"
                f"  embedding rows {m.vocab_rows}, tokenizer {m.tokenizer_size}, embeddings {tied}"
            )
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"problem: {p}" for p in self.problems]
        lines.append("compatible" if self.ok else f"NOT compatible: {len(self.problems)} problem(s)")
        return "\n".join(lines)


def _tokenizer_size(directory: Path) -> int | None:
    if not any((directory / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json")):
        return None
    try:
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(str(directory)))
    except Exception:  # a tokenizer transformers cannot read is reported as unknown, not fatal
        return None


def embedding_names(ckpt: Checkpoint) -> list[str]:
    """Tensors whose rows are vocabulary entries (input embeddings, output heads)."""
    vocab = ckpt.config.get("vocab_size")
    names = []
    for name, info in ckpt.tensors.items():
        if len(info.shape) != 2 or "position" in name or "token_type" in name or LAYER_INDEX.search(name):
            continue
        if any(h in name for h in EMBEDDING_HINTS) or (vocab is not None and info.shape[0] == vocab):
            names.append(name)
    return names


def summarize(ckpt: Checkpoint, *, with_tokenizer: bool = True) -> ModelSummary:
    dtypes: dict[str, int] = {}
    for info in ckpt.tensors.values():
        key = str(info.dtype).replace("torch.", "")
        dtypes[key] = dtypes.get(key, 0) + 1
    embeddings = [n for n in embedding_names(ckpt) if "lm_head" not in n and "embed_out" not in n]
    vocab_rows = ckpt.tensors[embeddings[0]].shape[0] if embeddings else None
    tied = ckpt.config.get("tie_word_embeddings")
    if tied is None and any(n.endswith("lm_head.weight") for n in ckpt.tensors):
        tied = False
    return ModelSummary(
        source=ckpt.source,
        architecture=ckpt.architecture,
        num_tensors=len(ckpt.tensors),
        num_parameters=ckpt.num_parameters,
        dtypes=dtypes,
        vocab_rows=vocab_rows,
        tokenizer_size=_tokenizer_size(ckpt.directory) if with_tokenizer else None,
        tied_embeddings=tied,
    )


def check_compatible(
    checkpoints: Sequence[Checkpoint],
    *,
    reference: Checkpoint | None = None,
    with_tokenizer: bool = True,
) -> CompatReport:
    """Compare every checkpoint with the reference (the base, else the first) tensor by tensor."""
    reference = reference or checkpoints[0]
    report = CompatReport([summarize(c, with_tokenizer=with_tokenizer) for c in checkpoints])
    for summary in report.models:
        if summary.tokenizer_size and summary.vocab_rows and summary.tokenizer_size > summary.vocab_rows:
            report.warnings.append(
                f"{summary.source}: tokenizer has {summary.tokenizer_size} tokens but the embedding has "
                f"{summary.vocab_rows} rows"
            )
    ref_summary = report.models[checkpoints.index(reference)] if reference in checkpoints else summarize(reference)
    for ckpt, summary in zip(checkpoints, report.models):
        if ckpt is not reference:
            _compare_summaries(ckpt, summary, reference, ref_summary, report)
            _compare_tensors(ckpt, reference, report)
    return report


def _compare_summaries(
    ckpt: Checkpoint, summary: ModelSummary, reference: Checkpoint, ref_summary: ModelSummary, report: CompatReport
) -> None:
    """Warnings on what differs from the reference as a whole: architecture, tied embeddings."""
    if summary.architecture != ref_summary.architecture:
        report.warnings.append(
            f"{ckpt.source}: architecture {summary.architecture} differs from {reference.source} "
            f"({ref_summary.architecture})"
        )
    if (
        summary.tied_embeddings is not None
        and ref_summary.tied_embeddings is not None
        and summary.tied_embeddings != ref_summary.tied_embeddings
    ):
        report.warnings.append(
            f"{ckpt.source}: embeddings are {'tied' if summary.tied_embeddings else 'untied'} but "
            f"{'tied' if ref_summary.tied_embeddings else 'untied'} in {reference.source}; "
            "the output follows the reference"
        )


def _compare_tensors(ckpt: Checkpoint, reference: Checkpoint, report: CompatReport) -> None:
    """Problems and warnings tensor by tensor: missing or extra names, shapes (vocabulary sizes apart), dtypes."""
    missing = [n for n in reference.tensors if n not in ckpt.tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        report.problems.append(f"tensor {missing[0]} is missing in {ckpt.source}{more}")
    extra = [n for n in ckpt.tensors if n not in reference.tensors]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        report.warnings.append(f"{ckpt.source}: tensor {extra[0]} is not in {reference.source}; ignored{more}")
    embeddings = set(embedding_names(reference))
    dtype_differs = []
    for name, ref_info in reference.tensors.items():
        info = ckpt.tensors.get(name)
        if info is None:
            continue
        if info.shape != ref_info.shape:
            if name in embeddings and info.shape[1:] == ref_info.shape[1:]:
                problem = (
                    f"vocabulary sizes differ: {name} has {ref_info.shape[0]} rows in {reference.source} "
                    f"but {info.shape[0]} in {ckpt.source}; merge models that share a tokenizer, or set "
                    "`tokenizer: {source: base}` (or a model path) to merge over one vocabulary"
                )
                report.vocab_problems.append(problem)
            else:
                problem = (
                    f"tensor {name}: shape {list(ref_info.shape)} in {reference.source} but "
                    f"{list(info.shape)} in {ckpt.source}"
                )
            report.problems.append(problem)
        elif info.dtype != ref_info.dtype:
            dtype_differs.append(name)
    if dtype_differs:
        report.warnings.append(
            f"{ckpt.source}: {len(dtype_differs)} tensors have another dtype than in {reference.source} "
            f"(e.g. {dtype_differs[0]}); they are cast to the merge dtype"
        )
