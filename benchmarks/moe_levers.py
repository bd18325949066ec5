"""MoE-fication on the real packaged models: partitions × routers, the non-ReLU levers, healing, targets.

    python benchmarks/moe_levers.py minilm --configs kmeans,random,coactivation   # fit + score, appended
    python benchmarks/moe_levers.py smollm2 --configs base50,oracle50
    python benchmarks/moe_levers.py minilm --configs heal_ffn_800                 # the best healing measured
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
import time
from pathlib import Path
from typing import Any

import torch

from posthoc.analyse.activations import Activations, ActiveCounts, CoActivation, InputSample, Moments, collect
from posthoc.analyse.calibration import load_calibration
from posthoc.analyse.evaluate import load_model
from posthoc.analyse.moe import MoEfier
from posthoc.analyse.moe_eval import (
    Scorer,
    active_fraction,
    measured_fraction,
    moe_installed,
    per_neuron_oracle,
)
from posthoc.assets import minilm_dir, smollm2_gguf

WORK = Path(__file__).parent / ".work" / "moe"

MODELS: dict[str, dict[str, Any]] = {
    "minilm": {"spec": minilm_dir, "max_tokens": 50_000, "router_tokens": 20_000, "max_length": 128,
               "eval_texts": 445, "eval_tokens": None, "sample_dtype": torch.float32},
    # CMoE calibrates on 8 × 2,048 tokens; SmolLM2's sample is kept whole, in float16 (30 layers)
    "smollm2": {"spec": smollm2_gguf, "max_tokens": 16_384, "router_tokens": 16_384, "max_length": 256,
                "eval_texts": 445, "eval_tokens": 8_192, "sample_dtype": torch.float16},
}

ALL = ("oracle", "centroid", "mlp")
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
        "heal50_budget": ({"experts": 64, "top_k": 32, "score": "output", "compensation": True, "lora_rank": 32,
                           "layer_heal_epochs": 0, "heal_steps": 40, "heal_hidden": 1.0, "heal_lr": 3e-3,
                           "heal_ffn_lr": 3e-4}, ("mlp",)),
    },
}
NEURON_ORACLE = {"minilm": (0.25, 0.5), "smollm2": (0.5, 0.25)}


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
        started = time.perf_counter()
        if config.startswith("neurons"):  # per-token, per-neuron oracle at this fraction, e.g. neurons25
            fraction = int(config[len("neurons"):]) / 100
            with per_neuron_oracle(model, fraction, score="output"):
                scores = scorer.score()
            record(name, {"config": config, "router": "per-neuron oracle", "neurons": fraction, **scores,
                          "eval_s": round(time.perf_counter() - started, 1)})
            continue
        params, routers = CONFIGS[name][config] if config in CONFIGS[name] else extra[config]
        settings = {"max_tokens": setting["max_tokens"], "router_tokens": setting["router_tokens"],
                    "max_length": setting["max_length"], "heal_batch_size": 8 if name == "minilm" else 4,
                    "progress": False, "threads": 1, **params}
        moe = MoEfier(**settings).fit(model, calib, tokenizer=tok, activations=acts)
        fit_s = time.perf_counter() - started
        for router in routers:
            if router != moe.router and router != "oracle" and router not in moe.routers_[0]:
                continue
            t0 = time.perf_counter()
            fitted = router == moe.router  # per-layer k, thresholds and healing belong to the fitted router
            has_heal = any(moe.heal_state_ or [])
            for healed in ((False, True) if fitted and has_heal else (False,)):
                with moe_installed(moe, model, router=router, top_k=None if fitted else moe.top_k,
                                   healed=healed) as layers:
                    scores = scorer.score()
                    neurons, measured = active_fraction(layers), measured_fraction(layers)
                record(name, {"config": config, "router": router, "healed": healed, "params": params,
                              "neurons": round(neurons, 4), "neurons_measured": measured and round(measured, 4),
                              **scores, "top_k_per_layer": moe.top_k_,
                              "recall": [r.get(router) for r in moe.recall_], "fit_s": round(fit_s, 1),
                              "timings": {k: round(v, 1) for k, v in moe.timings_.items()},
                              "heal": {k: v for k, v in (moe.heal_log_ or {}).items() if k != "losses"},
                              "eval_s": round(time.perf_counter() - t0, 1)})
                t0 = time.perf_counter()


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
    parser.add_argument("--params", help="JSON MoEfier parameters of one more configuration, run with the MLP "
                                         "router and recorded under --name (e.g. '{\"heal_steps\": 50}')")
    parser.add_argument("--name", default="custom", help="name of the --params configuration")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        print(table(args.model))
    else:
        extra = {args.name: (json.loads(args.params), ("mlp",))} if args.params else {}
        run(args.model, [c for c in args.configs.split(",") if c] + list(extra), extra)
