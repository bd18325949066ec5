"""`posthoc split moe` as one library call: fit, evaluate on held-out text, report, write OUT_DIR.

    from posthoc.analyse.moe.run import moefy
    result = moefy("path/to/model", "out/moe", "bbc:train", eval_data="bbc:test", experts=16, top_k=4)
    result.summary       # dense and MoE quality at the fitted top_k, router recall, timings

The README demo's step is `posthoc.demo.moe.demo_step`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posthoc.analyse.calibration import CalibrationData, load_calibration
from posthoc.analyse.moe.moefier import MoEfier
from posthoc.analyse.moe.report import build_report
from posthoc.analyse.moe.scoring import Scorer, active_fraction, ks_for, moe_installed, sweep, time_ffn
from posthoc.checkpoint import check_output_location, open_checkpoint
from posthoc.ffn import ffn_weights
from posthoc.models import load_model
from posthoc.threads import torch_threads

log = logging.getLogger(__name__)


@dataclass
class MoEResult:
    out_dir: Path
    moe: MoEfier
    rows: list[dict[str, Any]]  # quality sweep rows (router, k, fraction, scores, label)
    dense: dict[str, float]
    summary: dict[str, Any] = field(default_factory=dict)


def moefy(
    model: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    calib: Any,
    *,
    eval_data: Any = None,
    eval_texts: int = 200,
    eval_tokens: int = 8_192,
    compare: bool = False,
    report: bool = True,
    speed: bool = True,
    force: bool = False,
    text_column: str | None = None,
    **params: Any,
) -> MoEResult:
    """MoE-fy `model` (a checkpoint spec) with calibration data `calib` and write OUT_DIR.

    eval_data: held-out text for the quality figures (default: 10 % of the calibration texts, held out
    before fitting); eval_texts / eval_tokens bound its size (encoders / decoders). compare: also fit the
    other partitions (random, kmeans, coactivation) for the report's comparison (three fits). report:
    quality sweeps at 10 … 100 % of experts for the oracle, centroid and MLP routers, before and after
    healing, and the FFN speed at the fitted top_k. Everything else goes to `MoEfier(**params)`.
    """
    started = time.perf_counter()
    moe = MoEfier(**params)
    moe.validate_params()
    with open_checkpoint(model) as ckpt:  # refuse a bad output location before minutes of work
        inputs = [ckpt.directory] + ([Path(ckpt.source)] if Path(str(ckpt.source)).exists() else [])
    check_output_location(Path(out_dir), inputs, force)
    data, held_out = calibration_and_held_out(calib, eval_data, eval_texts, text_column, moe.seed)
    net, tokenizer, directory = load_model(model)
    moe.fit(net, data, tokenizer=tokenizer)
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    dense: dict[str, float] = {}
    pages = None
    with torch_threads(moe.threads):
        if report:
            scorer = Scorer(net, tokenizer, held_out, probe_data=data.select(range(min(len(data), 1000))),
                            max_length=moe.max_length, max_tokens=eval_tokens)
            dense = dict(scorer.dense)
            rows = quality_rows(moe, net, tokenizer, data, scorer, compare)
            summary["fitted"] = next(row for row in rows if row["label"] == "fitted")
        speeds = measure_speed(moe, net) if speed else []
        if report:
            pages = build_report(moe, rows, dense, speeds, title_model=str(model), held_out=held_out.name)
    summary.update({"dense": dense, "speed": speeds[:1], "recall": moe.recall_, "timings": moe.timings_,
                    "seconds": round(time.perf_counter() - started, 1)})
    out = moe.save(out_dir, base=directory, force=force, report=pages,
                   extra={"evaluation": {"held_out": held_out.name, "dense": dense, "rows": rows, "speed": speeds}})
    return MoEResult(out, moe, rows, dense, summary)


def calibration_and_held_out(calib: Any, eval_data: Any, eval_texts: int, text_column: str | None, seed: int
                             ) -> tuple[CalibrationData, CalibrationData]:
    """(calibration texts, held-out texts): `eval_data`, or 10 % of `calib` held out; at most `eval_texts`."""
    data = calib if isinstance(calib, CalibrationData) else load_calibration(calib, text_column=text_column)
    if eval_data is None:
        data, held_out = data.split(0.1, seed=seed)
    else:
        held_out = eval_data if isinstance(eval_data, CalibrationData) else load_calibration(eval_data, text_column=text_column)
    return data, held_out.select(range(min(eval_texts, len(held_out))), held_out.name)


def quality_rows(moe: MoEfier, net: torch.nn.Module, tokenizer: Any, data: CalibrationData, scorer: Scorer,
                 compare: bool) -> list[dict[str, Any]]:
    """The report's sweeps (routers × k, unhealed and healed), the fitted configuration as posthoc.load gives it
    (label "fitted"), and with `compare` the sweeps of MoEfiers fitted with the other partitions."""
    ks = ks_for(moe.experts)
    routers = ["oracle", "centroid"] + ([moe.router] if moe.router in ("mlp", "gate") else [])
    rows = sweep(moe, net, scorer, routers=routers, ks=ks, healed=False, label=moe.partition)
    if moe.heal_log_ is not None:
        rows += sweep(moe, net, scorer, routers=[moe.router], ks=ks, healed=True, label=f"{moe.partition}+healed")
    with moe_installed(moe, net) as layers:
        rows.append({"label": "fitted", "router": moe.router, "k": moe.top_k, "fraction": moe.top_k / moe.experts,
                     "neurons": active_fraction(layers), **scorer.score()})
    if compare:
        for other in ("random", "kmeans", "coactivation"):
            if other == moe.partition:
                continue
            alt = MoEfier(**{**moe.get_params(), "partition": other, "heal_steps": 0})
            alt.fit(net, data, tokenizer=tokenizer)
            rows += sweep(alt, net, scorer, routers=routers, ks=ks, healed=False, label=other)
    return rows


def measure_speed(moe: MoEfier, net: torch.nn.Module, tokens: int = 2048) -> list[dict[str, Any]]:
    """FFN block time of the first FFN, dense vs MoE at the fitted routing (router included), on
    `tokens` of its sampled calibration inputs (repeated when the sample is smaller)."""
    if moe.router == "oracle":
        return []  # the oracle computes every neuron: nothing to gain
    x = moe.speed_inputs_
    x = x.repeat(-(-tokens // len(x)), 1)[:tokens]
    dense = ffn_weights(net, moe.ffns_[0])
    with moe_installed(moe, net) as layers:
        timing = time_ffn(layers[0], dense, x)
        return [{"layer": 0, "tokens": tokens, "top_k": layers[0].top_k, "experts": layers[0].experts, **timing}]

