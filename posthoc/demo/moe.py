"""The README demo's MoE-fication step: the demo's base encoder split into experts, scored against itself.

    from posthoc.demo.moe import demo_step      # a DemoStep: demo_step(context) -> str

The base encoder (all-MiniLM-L6-v2 in the real demo) is MoE-fied with 16 experts per FFN (k-means
partition, MLP router, skipped experts compensated by their calibration-mean output), calibrated on
the demo's train texts, and written to `work_dir/moe/model`
(reused on the next run when base, texts and settings match, unless `fresh`). The output is then
loaded back the way a user would, `posthoc.load(dir, top_k=K)`, at K = 4 and 8 of 16 (25 % and 50 % of
the FFN neurons per token), and scored on the tasks' test texts against the dense base:

- embedding cosine: mean cosine of the MoE and dense mean-pooled embeddings;
- probe accuracy: each task's linear probe trained on the *dense* base embeddings (the demo's own
  `probe-<task>`, or one trained here if absent) read on the MoE embeddings;
- FFN block time of the first layer on 2,048 tokens, dense vs MoE (router included), 1 thread, this machine now.

No healing (it takes minutes): see `posthoc split moe --heal-steps` and benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from posthoc.analyse.calibration import CalibrationData
from posthoc.analyse.evaluate import mean_cosine
from posthoc.analyse.moe.layers import moe_layers
from posthoc.analyse.moe.moefier import MoEfier
from posthoc.analyse.moe.scoring import time_ffn
from posthoc.data import TextClassificationData
from posthoc.demo.context import DemoContext, texts_digest
from posthoc.ffn import ffn_weights, find_ffns
from posthoc.finetune import ClassificationHead, linear_probe
from posthoc.models import Encoder
from posthoc.runtime import load
from posthoc.threads import torch_threads

# What decides the cached output (with the base model and the calibration texts).
SETTINGS: dict[str, Any] = {
    "experts": 16, "top_k": 4, "partition": "kmeans", "router": "mlp", "compensation": True,
    "max_tokens": 16_000, "router_tokens": 8_000, "router_epochs": 30, "seed": 0,
}
TOP_KS = (4, 8)
TEST_PER_CLASS = 30  # test texts per class scored (each scoring is one encoder pass over them)
RECORD = "demo.json"


def _moefy_cached(context: DemoContext, calib: CalibrationData) -> tuple[Path, dict[str, Any], bool]:
    """(output dir, fit summary, cached?): fit and save unless an output for the same key is there."""
    root = context.work_dir / "moe"
    out, record_path = root / "model", root / RECORD
    params = {**SETTINGS, "max_length": context.settings.finetune.max_length}
    key = {"base_model": str(Path(context.base_dir).resolve()), "calibration": texts_digest(calib.texts),
           "params": params}
    if not context.fresh and record_path.is_file() and (out / "experts.json").is_file():
        record = json.loads(record_path.read_text())
        if record.get("key") == key:
            return out, record["fit"], True
    root.mkdir(parents=True, exist_ok=True)
    record_path.unlink(missing_ok=True)
    moe = MoEfier(**params, progress=context.progress, threads=context.threads).fit(str(context.base_dir), calib)
    moe.save(out, force=True)
    fit = {"tokens": moe.tokens_, "seconds": round(moe.timings_["total"], 1),
           "recall_mlp": sum(r["mlp"] for r in moe.recall_) / len(moe.recall_)}
    record_path.write_text(json.dumps({"key": key, "fit": fit}, indent=2) + "\n")
    return out, fit, False


def _probes(context: DemoContext, dense: Encoder, max_length: int) -> dict[str, ClassificationHead]:
    """Per task, a head trained on dense base embeddings: the demo's linear probe when it is there."""
    heads = {}
    for name, split in context.splits.items():
        saved = context.work_dir / f"probe-{name}"
        if (saved / "probe.json").is_file():
            heads[name] = ClassificationHead.load(saved)
            continue
        train = split.train.limit_per_class(TEST_PER_CLASS)
        embeddings = dense.embed(train.texts, max_length=max_length, threads=context.threads)
        heads[name] = linear_probe(embeddings, train.labels, train.label_names,
                                   steps=context.settings.probe_steps, seed=context.settings.finetune.seed)
    return heads


def demo_step(context: DemoContext) -> str:
    """MoE-fy the demo's base encoder and score it at top-4 and top-8 of 16 experts (see the module docstring)."""
    started = time.perf_counter()
    names = list(context.splits)
    train = list(dict.fromkeys(t for name in names for t in context.splits[name].train.texts))
    random.Random(0).shuffle(train)  # --max-tokens takes the first texts: let every task's classes in
    out, fit, cached = _moefy_cached(context, CalibrationData(tuple(train), name="demo train texts"))
    tests = {name: context.splits[name].test.limit_per_class(TEST_PER_CLASS) for name in names}
    rows, speed = _score(context, out, tests)

    n_tests = sum(len(t) for t in tests.values())
    fitted = "cached" if cached else f"fitted in {fit['seconds']:.0f} s"
    lines = [
        f"MoE-fication of the base encoder: {SETTINGS['experts']} experts per FFN, k-means partition, MLP router, "
        "skipped experts compensated,",
        f"calibrated on {fit['tokens']:,} train tokens ({fitted}), "
        f"loaded with posthoc.load(top_k=K);",
        f"scored on {n_tests} test texts against the dense base (probes trained on dense base embeddings).",
        "",
        f"{'encoder':<16}{'FFN neurons':>12}{'cosine':>9}" + "".join(f"{'probe ' + n:>10}" for n in names),
    ]
    for label, share, cosine, accuracy in rows:
        lines.append(f"{label:<16}{share:>12}{cosine:>9.3f}" + "".join(f"{accuracy[n]:>10.3f}" for n in names))
    if speed is not None:
        lines.append(f"FFN block, 2,048 tokens, 1 thread: {speed['dense_ms']:.1f} ms dense, {speed['moe_ms']:.1f} ms at "
                     f"top-{SETTINGS['top_k']} ({speed['speedup']:.2f}x; router, gather and scatter included)")
    lines.append(f"time: {time.perf_counter() - started:.1f} s; output: {out}")
    summary = {"rows": [{"encoder": r[0], "neurons": r[1], "cosine": r[2], "probe_accuracy": r[3]} for r in rows],
               "speed": speed, "fit": fit, "cached": cached}
    (context.work_dir / "moe" / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return "\n".join(lines)


def _score(
    context: DemoContext, out: Path, tests: dict[str, TextClassificationData]
) -> tuple[list[tuple[str, str, float, dict[str, float]]], dict[str, float] | None]:
    """Rows (encoder, share of FFN neurons, embedding cosine to dense, probe accuracy per task) for the dense
    base and the MoE output loaded at each of TOP_KS, and the FFN timing at the fitted top-k."""
    names = list(tests)
    max_length = context.settings.finetune.max_length
    dense_encoder = Encoder.load(context.base_dir)
    probes = _probes(context, dense_encoder, max_length)
    dense = _embed_tests(dense_encoder, tests, max_length, context.threads)
    rows = [("dense", "100%", 1.0, {n: probes[n].accuracy(dense[n], tests[n].labels) for n in names})]
    speed = None
    for k in TOP_KS:
        model, tokenizer = load(out, top_k=k, return_tokenizer=True)  # posthoc.load, as a user loads it
        moe = _embed_tests(Encoder(model, tokenizer, out), tests, max_length, context.threads)
        cosine = mean_cosine(torch.cat([moe[n] for n in names]), torch.cat([dense[n] for n in names]))
        rows.append((f"MoE top-{k}/{SETTINGS['experts']}", f"{k / SETTINGS['experts']:.0%}", cosine,
                     {n: probes[n].accuracy(moe[n], tests[n].labels) for n in names}))
        if k == SETTINGS["top_k"]:
            layer = moe_layers(model)[0]
            dense_ffn = ffn_weights(dense_encoder.model, find_ffns(dense_encoder.model)[0])
            x = torch.randn(2048, layer.d_model, generator=torch.Generator().manual_seed(0))
            with torch_threads(1):  # many small matmuls: on a shared machine a second thread mostly waits
                speed = time_ffn(layer, dense_ffn, x, repeats=5)
    return rows, speed


def _embed_tests(
    encoder: Encoder, tests: dict[str, TextClassificationData], max_length: int, threads: int | None
) -> dict[str, torch.Tensor]:
    """Every task's test texts embedded in one pass, cut per task."""
    embeddings = encoder.embed([t for test in tests.values() for t in test.texts], max_length=max_length,
                               threads=threads)  # fmt: skip
    parts, start = {}, 0
    for name, test in tests.items():
        parts[name] = embeddings[start : start + len(test)]
        start += len(test)
    return parts
