"""MoE-fication on the real packaged models: partitions × routers, the non-ReLU levers, healing, targets.

    python benchmarks/moe_levers.py minilm --configs kmeans,random,coactivation   # fit + score, appended
    python benchmarks/moe_levers.py smollm2 --configs base50,oracle50
    python benchmarks/moe_levers.py minilm --configs heal_target                  # healing to cosine >= 0.95
    python benchmarks/moe_levers.py minilm --name try --params '{"heal_steps": 50}'  # any other configuration
    python benchmarks/moe_levers.py minilm --table                               # markdown of what ran

One pass of calibration text is collected per model and cached (benchmarks/.work/moe/<model>_acts.*),
so every configuration fits from the same statistics; the dense reference (held-out embeddings and a
BBC topic probe trained on dense embeddings of the calibration texts, or the dense perplexity) is cached
too. Results are appended, one JSON line per (configuration, router), to benchmarks/.work/moe/<model>.jsonl.

Held-out text is never calibration text: calibration bbc:train, evaluation bbc:test (the seeded
stratified split posthoc uses everywhere). Threads: 1.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from posthoc.analyse.activations import Activations, ActiveCounts, CoActivation, InputSample, Moments, collect
from posthoc.analyse.calibration import load_calibration
from posthoc.analyse.moe.moefier import MoEfier
from posthoc.analyse.moe.scoring import (
    Scorer,
    active_fraction,
    measured_fraction,
    moe_installed,
    per_neuron_oracle,
)
from posthoc.assets import minilm_dir, smollm2_gguf
from posthoc.models import load_model

WORK = Path(__file__).parent / ".work" / "moe"

MODELS: dict[str, dict[str, Any]] = {
    "minilm": {"spec": minilm_dir, "max_tokens": 50_000, "router_tokens": 20_000, "max_length": 128,
               "eval_texts": 445, "eval_tokens": None, "sample_dtype": torch.float32},
    # CMoE calibrates on 8 × 2,048 tokens; SmolLM2's sample is kept whole, in float16 (30 layers)
    "smollm2": {"spec": smollm2_gguf, "max_tokens": 16_384, "router_tokens": 16_384, "max_length": 256,
                "eval_texts": 445, "eval_tokens": 8_192, "sample_dtype": torch.float16},
}

ALL = ("oracle", "centroid", "mlp")
GATE1536 = {"experts": 1536, "top_k": 768, "router": "gate", "score": "output", "gate_up_scale": True,
            "partition": "random", "kernel": "masked"}
# name -> (MoEfier parameters, routers to score). The budget is the fraction of FFN neurons computed
# per token: 25 % for MiniLM (16 experts, top-4), 50 % for SmolLM2 (16 experts, top-8).
CONFIGS: dict[str, dict[str, tuple[dict[str, Any], tuple[str, ...]]]] = {
    "minilm": {
        "random": ({"partition": "random"}, ALL),
        "kmeans": ({"partition": "kmeans"}, ALL),
        "coactivation": ({"partition": "coactivation"}, ALL),
        "e64": ({"experts": 64, "top_k": 16}, ALL),
        "e96": ({"experts": 96, "top_k": 24}, ALL),
        "output": ({"score": "output"}, ("oracle", "mlp")),
        "shared": ({"shared": 0.125, "experts": 56, "top_k": 8}, ("oracle", "mlp")),  # 12.5 % + 87.5 %·1/7
        "greedy": ({"layer_budget": "greedy"}, ("mlp",)),
        "threshold": ({"routing": "threshold"}, ("mlp",)),
        "compensation": ({"compensation": True}, ("mlp",)),
        "lora64": ({"lora_rank": 64}, ("mlp",)),
        "layerheal": ({"lora_rank": 64, "layer_heal_epochs": 10}, ("mlp",)),
        "heal": ({"heal_steps": 200, "heal_lr": 1e-3}, ("mlp",)),
        "heal_lora": ({"lora_rank": 64, "layer_heal_epochs": 10, "heal_steps": 200, "heal_lr": 1e-3}, ("mlp",)),
        # healing that also trains compensation, FFN biases and the experts' matrices, with per-layer
        # hidden-state loss: 300 / 450 / 800 steps (the last ~12.6 CPU-minutes of healing, all train texts)
        "heal_ffn_300": ({"compensation": True, "lora_rank": 64, "layer_heal_epochs": 5, "heal_steps": 300,
                          "heal_hidden": 1.0, "heal_biases": True, "heal_tokens": 100_000, "heal_lr": 2e-3,
                          "heal_ffn_lr": 1e-4}, ("mlp",)),
        "heal_ffn_450": ({"compensation": True, "lora_rank": 64, "layer_heal_epochs": 5, "heal_steps": 450,
                          "heal_hidden": 1.0, "heal_biases": True, "heal_tokens": 100_000, "heal_lr": 3e-3,
                          "heal_ffn_lr": 3e-4}, ("mlp",)),
        "heal_noffn_450": ({"compensation": True, "lora_rank": 64, "layer_heal_epochs": 5, "heal_steps": 450,
                            "heal_hidden": 1.0, "heal_biases": True, "heal_tokens": 100_000, "heal_lr": 3e-3},
                           ("mlp",)),  # heal_ffn_450 with the experts' matrices frozen
        "heal_ffn_800": ({"compensation": True, "lora_rank": 64, "layer_heal_epochs": 5, "heal_steps": 800,
                          "heal_hidden": 1.0, "heal_biases": True, "heal_tokens": 200_000, "heal_lr": 3e-3,
                          "heal_ffn_lr": 3e-4}, ("mlp",)),
        # experts' matrices trained in the layer-wise phase too, 15 epochs, 550 steps (~12.7 CPU-minutes of
        # healing at 1 thread): 0.928 at heal_lr 3e-3
        "heal_lffn15_550": ({"compensation": True, "lora_rank": 64, "layer_heal_epochs": 15, "heal_steps": 550,
                             "heal_hidden": 1.0, "heal_biases": True, "heal_tokens": 200_000, "heal_lr": 3e-3,
                             "heal_ffn_lr": 3e-4, "layer_heal_ffn_lr": 1e-3}, ("mlp",)),
        # section 7's target (cosine >= 0.95 at 25 %): the same at heal_lr 1e-4 and 800 steps, ~14 CPU-minutes
        "heal_target": ({"compensation": True, "lora_rank": 64, "layer_heal_epochs": 15, "heal_steps": 800,
                         "heal_hidden": 1.0, "heal_biases": True, "heal_tokens": 200_000, "heal_lr": 1e-4,
                         "heal_ffn_lr": 3e-4, "layer_heal_ffn_lr": 1e-3}, ("mlp",)),
    },
    "smollm2": {
        "base50": ({"experts": 16, "top_k": 8}, ALL),
        "e64_50": ({"experts": 64, "top_k": 32}, ("oracle", "mlp")),
        "output50": ({"experts": 64, "top_k": 32, "score": "output"}, ("oracle", "mlp")),
        "shared50": ({"shared": 0.25, "experts": 48, "top_k": 16, "score": "output"}, ("oracle", "mlp")),
        "layerheal50": ({"experts": 64, "top_k": 32, "score": "output", "lora_rank": 32, "layer_heal_epochs": 5},
                        ("mlp",)),
        "heal50": ({"experts": 64, "top_k": 32, "score": "output", "lora_rank": 32, "layer_heal_epochs": 5,
                    "heal_steps": 100, "heal_lr": 1e-3}, ("mlp",)),
        # gate router (GLU: the FFN's own gate activations, computed for every neuron and reused; no training)
        "gate16_50": ({"experts": 16, "top_k": 8, "router": "gate", "score": "output"}, ("gate",)),
        "gate64_50": ({"experts": 64, "top_k": 32, "router": "gate", "score": "output"}, ("gate",)),
        "gate192_50": ({"experts": 192, "top_k": 96, "router": "gate", "score": "output"}, ("gate",)),
        "gate384_50": ({"experts": 384, "top_k": 192, "router": "gate", "score": "output"}, ("gate",)),
        "gate16_50_up": ({"experts": 16, "top_k": 8, "router": "gate", "score": "output", "gate_up_scale": True},
                         ("gate",)),
        "gate64_50_up": ({"experts": 64, "top_k": 32, "router": "gate", "score": "output", "gate_up_scale": True},
                         ("gate",)),
        "gate192_50_up": ({"experts": 192, "top_k": 96, "router": "gate", "score": "output", "gate_up_scale": True},
                          ("gate",)),
        "gate384_50_up": ({"experts": 384, "top_k": 192, "router": "gate", "score": "output", "gate_up_scale": True},
                          ("gate",)),
        "gate384_50_up_coact": ({"experts": 384, "top_k": 192, "router": "gate", "score": "output",
                                 "gate_up_scale": True, "partition": "coactivation"}, ("gate",)),
        # one neuron per expert (the per-neuron gate selection, CATS/TEAL-style), computed with the masked kernel
        # (the same function densely: evaluation only); then the cheap layer-wise levers on top
        "gate1536_50_up": ({**GATE1536}, ("gate",)),
        "gate1536_50_comp": ({**GATE1536, "compensation": True}, ("gate",)),
        "gate1536_50_lora64": ({**GATE1536, "compensation": True, "lora_rank": 64}, ("gate",)),
        "gate1536_50_layerheal": ({**GATE1536, "compensation": True, "lora_rank": 64, "layer_heal_epochs": 3},
                                  ("gate",)),
        "gate1536_50_lora64_nocomp": ({**GATE1536, "lora_rank": 64}, ("gate",)),
        "gate384_50_lora64": ({"experts": 384, "top_k": 192, "router": "gate", "score": "output",
                               "gate_up_scale": True, "compensation": True, "lora_rank": 64}, ("gate",)),
        "gate1536_50_thr": ({**GATE1536, "routing": "threshold"}, ("gate",)),
        "gate1536_50_thr_lora64": ({**GATE1536, "routing": "threshold", "compensation": True, "lora_rank": 64},
                                   ("gate",)),
        "gate192_50_thr": ({"experts": 192, "top_k": 96, "router": "gate", "score": "output", "routing": "threshold"},
                           ("gate",)),
        "heal50_budget": ({"experts": 64, "top_k": 32, "score": "output", "compensation": True, "lora_rank": 32,
                           "layer_heal_epochs": 0, "heal_steps": 40, "heal_hidden": 1.0, "heal_lr": 3e-3,
                           "heal_ffn_lr": 3e-4}, ("mlp",)),
    },
}
NEURON_ORACLE = {"minilm": (0.25, 0.5), "smollm2": (0.5, 0.25)}


@contextmanager
def per_neuron_gate(model: Any, fraction: float, up_rms: dict[int, torch.Tensor] | None = None) -> Iterator[None]:
    """The gate router at one-neuron granularity (CATS/TEAL-style, the limit of finer experts): every token
    keeps its top `fraction` of neurons by |act(W_gate x)|·‖W_down col‖ (× the up projection's calibration
    RMS with `up_rms`). Dense compute: for evaluation only."""
    from posthoc.ffn import find_ffns

    ffns = find_ffns(model)
    saved = []
    for f in ffns:
        gate, up, down = (model.get_submodule(p) for p in (f.gate, f.up, f.down))
        weight = down.weight.detach().float().norm(dim=0) * (1 if up_rms is None else up_rms[f.index])
        block = model.get_submodule(f.up.rpartition(".")[0])

        def forward(x, gate=gate, up=up, down=down, weight=weight, act=block.act_fn):
            a = act(gate(x))
            k = max(1, round(fraction * a.shape[-1]))
            keep = torch.zeros_like(a).scatter_(-1, (a.abs() * weight).topk(k, dim=-1).indices, 1.0)
            return down(a * keep * up(x))

        saved.append((block, block.forward))
        block.forward = forward
    try:
        yield
    finally:
        for block, original in saved:
            block.forward = original


def statistics(setting: dict[str, Any]) -> list[Any]:
    return [Moments(), InputSample(setting["router_tokens"], seed=0, dtype=setting["sample_dtype"]),
            ActiveCounts(top_fraction=0.1), CoActivation(top_fraction=0.1)]


def prepare(name: str) -> tuple[Any, Any, Any, Any, Scorer, dict[str, Any]]:
    setting = MODELS[name]
    WORK.mkdir(parents=True, exist_ok=True)
    model, tok, directory = load_model(setting["spec"]())
    calib, test = load_calibration("bbc:train"), load_calibration("bbc:test")
    held_out = test.select(range(min(setting["eval_texts"], len(test))), "bbc:test")
    acts_path = WORK / f"{name}_acts"
    if acts_path.with_suffix(".safetensors").is_file():
        acts = Activations.load(acts_path, model)
    else:
        started = time.perf_counter()
        acts = collect(model, calib, statistics(setting), tokenizer=tok, max_tokens=setting["max_tokens"],
                       max_length=setting["max_length"])
        acts.save(acts_path)
        print(f"collected {acts.tokens} tokens in {time.perf_counter() - started:.0f} s", flush=True)
    scorer = Scorer(model, tok, held_out, probe_data=calib, max_length=setting["max_length"],
                    max_tokens=setting["eval_tokens"] or 16_384, cache=WORK / f"{name}_dense.pt")
    return model, tok, calib, acts, scorer, setting


def windows(data: Any, words: int) -> Any:
    """The calibration texts cut into consecutive windows of `words` words, every text's first window first,
    then every second window, ...: the first ~200k tokens are (about) the usual truncated texts, and larger
    `heal_tokens` reach text that truncation at max_length drops (bbc:train truncated to 128 tokens holds
    199,424 tokens, so heal_tokens above that repeat nothing new without this). Healing data only: the
    statistics, probe and held-out texts are unchanged."""
    from posthoc.analyse.calibration import CalibrationData

    split = [t.split() for t in data.texts]
    rounds = max(len(w) for w in split) // words + 1
    texts = tuple(" ".join(w[r * words : (r + 1) * words]) for r in range(rounds) for w in split if len(w) > r * words)
    return CalibrationData(texts, name=f"{data.name}/windows{words}")


def heal_summary(log: dict[str, Any] | None) -> dict[str, Any]:
    """The healing log without its per-step losses, with the mean loss of the first and last 20 steps (single
    batches are noisy: their texts differ)."""
    log = log or {}
    losses = log.get("losses") or []
    summary = {k: v for k, v in log.items() if k != "losses"}
    if losses:
        summary["loss_first20"] = round(sum(losses[:20]) / len(losses[:20]), 4)
        summary["loss_last20"] = round(sum(losses[-20:]) / len(losses[-20:]), 4)
    return summary


def record(name: str, row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)
    with open(WORK / f"{name}.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def run(name: str, configs: list[str], extra: dict[str, tuple[dict[str, Any], tuple[str, ...]]] | None = None) -> None:
    extra = extra or {}
    torch.set_num_threads(1)  # 2 shared cores: one thread per experiment
    model, tok, calib, acts, scorer, setting = prepare(name)
    print(f"dense: {scorer.dense}", flush=True)
    for config in configs:
        started, cpu = time.perf_counter(), time.process_time()
        if config.startswith("gateneurons"):  # gate router per neuron, e.g. gateneurons50 / gateneurons50up
            fraction = int(config[len("gateneurons"):].removesuffix("up")) / 100
            up_rms = None
            if config.endswith("up"):
                up_rms = {}
                for f in acts.ffns:
                    x = acts.result(f.index, "inputs")["x"].float()
                    u = model.get_submodule(f.up)
                    up_rms[f.index] = torch.cat([u(x[j : j + 4096]).detach() for j in range(0, len(x), 4096)]
                                                ).square().mean(0).sqrt()
            with per_neuron_gate(model, fraction, up_rms):
                scores = scorer.score()
            record(name, {"config": config, "router": "per-neuron gate", "neurons": fraction, **scores,
                          "eval_s": round(time.perf_counter() - started, 1),
                          "eval_cpu_s": round(time.process_time() - cpu, 1), "load": os.getloadavg()[0],
                          "at": time.strftime("%H:%M:%S", time.gmtime())})
            continue
        if config.startswith("neurons"):  # per-token, per-neuron oracle at this fraction, e.g. neurons25
            fraction = int(config[len("neurons"):]) / 100
            with per_neuron_oracle(model, fraction, score="output"):
                scores = scorer.score()
            record(name, {"config": config, "router": "per-neuron oracle", "neurons": fraction, **scores,
                          "eval_s": round(time.perf_counter() - started, 1)})
            continue
        params, routers = CONFIGS[name][config] if config in CONFIGS[name] else extra[config]
        params = dict(params)
        words = params.pop("calib_windows", None)  # benchmark-only: heal on windows of the texts (see `windows`)
        heal_data = windows(calib, words) if words else calib
        settings = {"max_tokens": setting["max_tokens"], "router_tokens": setting["router_tokens"],
                    "max_length": setting["max_length"], "heal_batch_size": 8 if name == "minilm" else 4,
                    "progress": False, "threads": 1, **params}
        moe = MoEfier(**settings).fit(model, heal_data, tokenizer=tok, activations=acts)
        fit_s, fit_cpu = time.perf_counter() - started, time.process_time() - cpu
        for router in routers:
            if router != moe.router and router != "oracle" and router not in moe.routers_[0]:
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            fitted = router == moe.router  # per-layer k, thresholds and healing belong to the fitted router
            for healed in ((False, True) if fitted and moe.is_healed() else (False,)):
                with moe_installed(moe, model, router=router, top_k=None if fitted else moe.top_k,
                                   healed=healed) as layers:
                    scores = scorer.score()
                    neurons, measured = active_fraction(layers), measured_fraction(layers)
                record(name, {"config": config, "router": router, "healed": healed,
                              "params": {**params, **({"calib_windows": words} if words else {})},
                              "neurons": round(neurons, 4), "neurons_measured": measured and round(measured, 4),
                              **scores, "top_k_per_layer": moe.top_k_,
                              "recall": [r.get(router) for r in moe.recall_], "fit_s": round(fit_s, 1),
                              "timings": {k: round(v, 1) for k, v in moe.timings_.items()},
                              "heal": heal_summary(moe.heal_log_),
                              "fit_cpu_s": round(fit_cpu, 1), "eval_s": round(time.perf_counter() - t0, 1),
                              "eval_cpu_s": round(time.process_time() - c0, 1), "load": os.getloadavg()[0],
                              "at": time.strftime("%H:%M:%S", time.gmtime())})
                t0, c0 = time.perf_counter(), time.process_time()


def table(name: str) -> str:
    rows = [json.loads(line) for line in (WORK / f"{name}.jsonl").read_text().splitlines()]
    keys = ["cosine", "probe_accuracy", "probe_retained"] if name == "minilm" else ["perplexity", "perplexity_ratio"]
    lines = ["| config | router | healed | neurons/token | " + " | ".join(keys) + " | fit s |",
             "|---|---|---|---|" + "---|" * len(keys) + "---|"]
    for r in rows:
        values = " | ".join(f"{r[k]:.4f}" if isinstance(r.get(k), float) else "" for k in keys)
        lines.append(f"| {r['config']} | {r['router']} | {'yes' if r.get('healed') else ''} | {r['neurons']:.3f} | "
                     f"{values} | {r.get('fit_s', '')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--configs", default="", help="comma-separated names (see CONFIGS) or neuronsNN")
    parser.add_argument("--params", help="JSON MoEfier parameters of one more configuration, scored with its "
                                         "router (default mlp) and recorded under --name (e.g. '{\"heal_steps\": 50}')")
    parser.add_argument("--name", default="custom", help="name of the --params configuration")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        print(table(args.model))
    else:
        params = json.loads(args.params) if args.params else None
        extra = {args.name: (params, (params.get("router", "mlp"),))} if params else {}
        run(args.model, [c for c in args.configs.split(",") if c] + list(extra), extra)
