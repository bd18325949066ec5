"""CPU speed of the gate-routed MoE FFN (`--router gate`) vs the dense FFN at SmolLM2's shape.

    python benchmarks/moe_gate_speed.py                 # 1 thread, 2,048 tokens, 16/64/192/384 experts

FFN block: 2,048 tokens through one SwiGLU FFN (d 576, d_ff 1536); the dense baseline is transformers'
LlamaMLP, the MoE layer is posthoc's `MoEFFN` with a `GateRouter` (every gate computed, experts scored from
them, up and down only for the chosen experts, gates reused; gather and scatter included). Random weights
and Gaussian inputs: the gate routes roughly evenly. With a gate router the matmuls cost 1/3 + 2/3·f of
the dense FFN at a fraction f of the neurons, so 50 % is at best 1.5× and 25 % at best 2×. Minimum over
repeats (the machine is shared).
"""

from __future__ import annotations

import argparse
import os

import torch
from moe_speed import best_ms  # the sibling script (its folder is on sys.path when run)

from posthoc.analyse.moe.layers import GateRouter, MoEFFN
from posthoc.analyse.moe.partition import expert_sizes
from posthoc.ffn import FFNWeights


def main() -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--experts", default="16,64,192,384")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=576, intermediate_size=1536, hidden_act="silu")).eval()
    w = FFNWeights(mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach(), mlp.act_fn,
                   gate=mlp.gate_proj.weight.detach())
    x = torch.randn(2048, 576)
    dense_ms = best_ms(lambda: mlp(x), args.repeats)
    print(f"load average {os.getloadavg()[0]:.1f}, {args.threads} thread(s), 2,048 tokens, dense {dense_ms:.1f} ms")
    print("| what (SmolLM2 FFN 576→1536, gate router) | experts computed | dense ms | MoE ms | speed-up |")
    print("|---|---|---|---|---|")
    for experts in (int(e) for e in args.experts.split(",")):
        sizes = expert_sizes(w.d_ff, experts)
        router = GateRouter(sizes)
        with torch.no_grad():
            router.weight.copy_(w.down_norms())
        for fraction in (0.5, 0.25):
            k = max(1, round(fraction * experts))
            layer = MoEFFN(w, sizes, 0, router, top_k=k).eval()
            moe_ms = best_ms(lambda layer=layer: layer(x), args.repeats)
            print(f"| {experts} experts of {w.d_ff // experts} | {k}/{experts} ({fraction:.0%}) | {dense_ms:.1f} | "
                  f"{moe_ms:.1f} | {dense_ms / moe_ms:.2f}× |", flush=True)
    # one neuron per expert, masked kernel (the same function computed densely: what the benchmark evaluates)
    sizes = [1] * w.d_ff
    router = GateRouter(sizes)
    with torch.no_grad():
        router.weight.copy_(w.down_norms())
    layer = MoEFFN(w, sizes, 0, router, top_k=w.d_ff // 2).eval()
    layer.masked = True
    moe_ms = best_ms(lambda: layer(x), args.repeats)
    print(f"| {w.d_ff} experts of 1, masked kernel | {w.d_ff // 2}/{w.d_ff} (50%) | {dense_ms:.1f} | {moe_ms:.1f} | "
          f"{dense_ms / moe_ms:.2f}× |")


if __name__ == "__main__":
    main()
