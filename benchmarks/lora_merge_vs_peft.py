#!/usr/bin/env python3
"""Benchmark posthoc's LoRA merges against PEFT's ``add_weighted_adapter`` on the same adapters.

What it does
------------
1. Builds a random Llama (``--hidden``, ``--intermediate``, ``--layers``) and three random LoRA adapters
   on all seven projections of every layer, saved by PEFT itself (``init_lora_weights=False`` and a
   random lora_B, so every ΔW is non-zero), with equal ranks (``--rank``) in the first scenario and
   different ranks (``--ranks``) in the second. Weights are ``--weights`` (one negative by default).
2. For every PEFT ``combination_type`` in ``linear``, ``cat``, ``svd``, ``ties_svd`` it times
   ``add_weighted_adapter`` and reads the merged adapter's ΔW of every layer back from PEFT
   (``get_delta_weight``).
3. It runs the same merge with posthoc next to each (``PAIRS``), from the adapter directories on disk to a
   LoRA module on disk (``posthoc.merge.merge_checkpoints``, what ``posthoc merge`` runs): for ``linear``
   and ``cat``, ``task_arithmetic`` (exact, concatenated factors; run once, shown on both rows); for
   ``svd``, the same re-factored to the target rank (QR + core SVD); for ``ties_svd``, ``ties``
   re-factored to the target rank. The time includes reading and writing the files; the core math
   (``lowrank.refactor`` on factors in memory) is timed separately on the ``svd`` row.
4. The error of each result is ‖ΔW − ΔW_exact‖ / ‖ΔW_exact‖ over all layers, where ΔW_exact is
   Σ wᵢ (αᵢ/rᵢ) BᵢAᵢ in float64 (for TIES: TIES of the exact per-adapter ΔWᵢ, weights 1, which PEFT's and
   mergekit's TIES both compute the same way).

Reading the numbers
-------------------
* Threads: ``--threads`` (default 2) for both. The machine may be shared: the 1-minute load average is
  printed; times are the best of ``--repeat``.
* PEFT's ``svd`` uses its defaults (``svd_full_matrices=True``); its ``svd_rank`` is set to the target rank.
* ``linear`` in PEFT combines A and B separately (√w on each) and needs equal ranks: it is an
  approximation with cross-terms (PEFT's docstring says so; issue #3004). It cannot run on different ranks.

Usage::

    .venv/bin/python benchmarks/lora_merge_vs_peft.py
    .venv/bin/python benchmarks/lora_merge_vs_peft.py --hidden 2048 --intermediate 5632 --append-results
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(work: Path, args: argparse.Namespace, ranks: list[int], tag: str) -> tuple[Path, list[Path]]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base_dir = work / "base"
    if not base_dir.is_dir():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=1000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                             num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=16)
        LlamaForCausalLM(config).save_pretrained(base_dir)
    adapters = []
    for i, rank in enumerate(ranks):
        out = work / f"{tag}-adapter{i}"
        if not out.is_dir():
            torch.manual_seed(100 + i)
            model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                                   LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.02)
            model.save_pretrained(out)
        adapters.append(out)
    return base_dir, adapters


def exact_changes(adapters: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """Σ wᵢ (α/r) Bᵢ Aᵢ per layer, float64, from the adapter files (PEFT's conventions)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path, w in zip(adapters, weights):
        config = json.loads((path / "adapter_config.json").read_text())
        tensors = load_file(path / "adapter_model.safetensors")
        for key, a in tensors.items():
            if not key.endswith("lora_A.weight"):
                continue
            module = key[len("base_model.model."):-len(".lora_A.weight")]
            b = tensors[key.replace("lora_A", "lora_B")]
            phi = (config["lora_alpha"] / a.shape[0]) * (b.double() @ a.double())
            out[module] = out.get(module, 0) + w * phi
    return out


def per_adapter_changes(adapters: list[Path]) -> list[dict[str, torch.Tensor]]:
    return [exact_changes([a], [1.0]) for a in adapters]


def ties_reference(adapters: list[Path], density: float) -> dict[str, torch.Tensor]:
    """TIES (weights 1) of the exact per-adapter ΔWᵢ: trim to top-density, elect sign, disjoint mean."""
    changes = per_adapter_changes(adapters)
    out = {}
    for module in changes[0]:
        stacked = torch.stack([c[module] for c in changes])  # (n, m, k)
        flat = stacked.reshape(len(changes), -1)
        k = int(density * flat.shape[1])
        kept = torch.zeros_like(flat)
        for i in range(len(changes)):
            idx = flat[i].abs().topk(k).indices
            kept[i, idx] = flat[i, idx]
        sign = torch.sign(kept.sum(0))
        agree = (torch.sign(kept) == sign) & (kept != 0)
        out[module] = ((kept * agree).sum(0) / agree.sum(0).clamp(min=1)).reshape(stacked.shape[1:])
    return out


def error(result: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> float:
    num = sum(float((result[m].double() - exact[m]).square().sum()) for m in exact)
    den = sum(float(exact[m].square().sum()) for m in exact)
    return math.sqrt(num / den)


def peft_merge(base_dir: Path, adapters: list[Path], weights: list[float], combination: str, rank: int,
               density: float, repeat: int) -> tuple[float, dict[str, torch.Tensor]] | str:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapters))]
    kwargs = {}
    if combination in ("svd", "ties_svd"):
        kwargs["svd_rank"] = rank
    if combination.startswith("ties"):
        kwargs["density"] = density
    best = math.inf
    for attempt in range(repeat):
        started = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.add_weighted_adapter(names, weights, f"merged{attempt}", combination_type=combination, **kwargs)
        except (ValueError, RuntimeError) as failure:
            return f"fails: {str(failure).splitlines()[0][:80]}"
        best = min(best, time.perf_counter() - started)
    merged = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and f"merged{repeat - 1}" in module.lora_A:
            merged[name] = module.get_delta_weight(f"merged{repeat - 1}").detach().double()
    return best, merged


def ours(base_dir: Path, adapters: list[Path], weights: list[float], method: str, rank: int | None,
         density: float, work: Path, repeat: int) -> tuple[float, dict[str, torch.Tensor], float | None]:
    from posthoc.merge.config import MergeConfig
    from posthoc.merge.engine import merge as merge_checkpoints
    from posthoc.modules.module import open_module

    params = [{"weight": w, **({"density": density} if method == "ties" else {})} for w in weights]
    config = MergeConfig.from_dict({
        "merge_method": method, "base_model": str(base_dir),
        "models": [{"model": str(a), "parameters": p} for a, p in zip(adapters, params)],
    })
    best, result = math.inf, None
    for _ in range(repeat):
        out = work / f"ours-{method}-{rank}"
        started = time.perf_counter()
        result = merge_checkpoints(config, out, force=True, progress=False, rank=rank)
        best = min(best, time.perf_counter() - started)
    merged = {}
    with open_module(result.out_dir) as module:
        for name in module.names:
            if module.storage(name) == "lora":
                merged[name[: -len(".weight")]] = module.delta(name).double()
    return best, merged, result.refactor_error


def core_refactor(adapters: list[Path], weights: list[float], rank: int, repeat: int) -> float:
    """Seconds of the math alone: QR + core SVD of every layer's stacked factors, factors in memory."""
    from safetensors.torch import load_file

    from posthoc.modules import lowrank

    factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for path, w in zip(adapters, weights):
        config = json.loads((path / "adapter_config.json").read_text())
        tensors = load_file(path / "adapter_model.safetensors")
        for key, a in tensors.items():
            if key.endswith("lora_A.weight"):
                b = tensors[key.replace("lora_A", "lora_B")]
                factors.setdefault(key, []).append((w * config["lora_alpha"] / a.shape[0] * b, a))
    best = math.inf
    for _ in range(repeat):
        started = time.perf_counter()
        for pairs in factors.values():
            lowrank.refactor([b for b, _ in pairs], [a for _, a in pairs], rank)
        best = min(best, time.perf_counter() - started)
    return best


# PEFT combination type -> what posthoc runs for the same merge (method, target rank or None = exact, note).
PAIRS = {
    "linear": ("task_arithmetic", None, "exact: concatenated factors"),
    "cat": ("task_arithmetic", None, "exact: concatenated factors"),
    "svd": ("task_arithmetic", "target", "QR + core SVD"),
    "ties_svd": ("ties", "target", "TIES per tensor + truncated SVD"),
}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    scenarios = [("equal ranks", [args.rank] * 3), ("different ranks", args.ranks)]
    for label, ranks in scenarios:
        base_dir, adapters = build(work, args, ranks, label.replace(" ", "-"))
        exact = exact_changes(adapters, args.weights)
        ties_exact = ties_reference(adapters, args.density)
        done: dict[tuple[str, int | None], tuple[float, float, float | None]] = {}
        for combination, (method, target, how) in PAIRS.items():
            ties = combination == "ties_svd"
            weights = [1.0] * 3 if ties else args.weights
            reference = ties_exact if ties else exact
            row = {"scenario": label, "merge": combination, "weights": weights}
            got = peft_merge(base_dir, adapters, weights, combination, args.target_rank, args.density, args.repeat)
            if isinstance(got, str):
                row.update(peft_error=got, peft_seconds=None, peft_rank="-")
            else:
                seconds, merged = got
                row.update(peft_error=error(merged, reference), peft_seconds=seconds,
                           peft_rank={"linear": ranks[0], "cat": sum(ranks)}.get(combination, args.target_rank))
            rank = args.target_rank if target == "target" else None
            if (method, rank) not in done:  # linear and cat are the same merge for posthoc: run it once
                seconds, merged, reported = ours(base_dir, adapters, weights, method, rank, args.density, work, args.repeat)
                done[method, rank] = (error(merged, reference), seconds, reported)
            ours_error, ours_seconds, reported = done[method, rank]
            row.update(ours=f"{method}{f' --rank {rank}' if rank else ''} ({how})", ours_rank=rank or sum(ranks),
                       ours_error=ours_error, ours_seconds=ours_seconds, ours_reported_error=reported)
            if combination == "svd":
                row["ours_math_seconds"] = core_refactor(adapters, weights, args.target_rank, args.repeat)
            rows.append(row)
    return {"rows": rows, "settings": {k: v for k, v in vars(args).items() if k != "append_results"},
            "load_average": os.getloadavg()[0], "torch": torch.__version__, "peft": _peft_version()}


def _peft_version() -> str:
    import peft

    return peft.__version__


def table(results: dict) -> str:
    s = results["settings"]
    lines = [
        f"Random Llama, hidden {s['hidden']}, FFN {s['intermediate']}, {s['layers']} layers: 3 LoRAs (α = 2r) on all 7 "
        f"projections ({7 * s['layers']} matrices); weights {s['weights']} (ties_svd: 1, 1, 1, density {s['density']}); "
        f"equal ranks {s['rank']}, different ranks {s['ranks']}; target rank {s['target_rank']}. Error = "
        f"‖ΔW − ΔW_exact‖/‖ΔW_exact‖ over all layers, ΔW_exact = Σ wᵢ(α/rᵢ)BᵢAᵢ in float64 (ties_svd: TIES of the "
        f"exact ΔWᵢ), so a rank-{s['target_rank']} result cannot reach 0. PEFT {results['peft']}: "
        "`add_weighted_adapter` in memory; posthoc: `posthoc merge` from the adapter files to a LoRA module on disk "
        f"(reading and writing included; 'math' = the QR + core SVD alone). {s['threads']} threads, best of "
        f"{s['repeat']}, 1-min load average {results['load_average']:.2f}, torch {results['torch']}.",
        "",
        "| scenario | PEFT combination | PEFT rank | PEFT rel. error | PEFT s | posthoc | posthoc rank | posthoc rel. error "
        "| posthoc s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        peft_err = r["peft_error"] if isinstance(r["peft_error"], str) else f"{r['peft_error']:.2e}"
        peft_s = "—" if r["peft_seconds"] is None else f"{r['peft_seconds']:.2f}"
        ours_s = f"{r['ours_seconds']:.2f}"
        if "ours_math_seconds" in r:
            ours_s += f" (math {r['ours_math_seconds']:.2f})"
        lines.append(f"| {r['scenario']} | {r['merge']} | {r['peft_rank']} | {peft_err} | {peft_s} | {r['ours']} | "
                     f"{r['ours_rank']} | {r['ours_error']:.2e} | {ours_s} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--ranks", type=int, nargs=3, default=[8, 16, 32])
    parser.add_argument("--target-rank", type=int, default=16)
    parser.add_argument("--weights", type=float, nargs=3, default=[1.0, 0.5, -0.3])
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "posthoc-lora-bench"))
    parser.add_argument("--append-results", action="store_true", help="Append the table to benchmarks/RESULTS.md")
    parser.add_argument("--clean", action="store_true", help="Remove the work dir afterwards")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = run(args)
    text = table(results)
    print(text)
    Path(args.work_dir, "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    if args.append_results:
        path = Path(__file__).with_name("RESULTS.md")
        with path.open("a") as f:
            f.write("\n## LoRA merging vs PEFT\n\n`benchmarks/lora_merge_vs_peft.py`\n\n" + text + "\n")
    if args.clean:
        shutil.rmtree(args.work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
