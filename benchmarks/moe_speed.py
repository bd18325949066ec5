"""CPU speed of MoE FFN layers vs the dense FFN, and of whole models (issue 4, section 7).

    python benchmarks/moe_speed.py                      # both shapes, FFN blocks and whole models
    python benchmarks/moe_speed.py --threads 1 --repeats 30

FFN block: 2,048 tokens through one FFN at MiniLM's shape (d 384, d_ff 1536, GELU, BERT modules) and
SmolLM2's (d 576, d_ff 1536, SwiGLU, Llama modules); the dense baseline is transformers' own module
(BertIntermediate + output dense, LlamaMLP), the MoE layer is posthoc's (16 experts, MLP router, top-k,
router + gather + scatter included). Whole model: the real packaged model's forward pass on 2,048
tokens (16 × 128 for MiniLM, 8 × 256 for SmolLM2 without the LM head), dense vs `posthoc.load`-style MoE
layers at 25 % and 50 % of experts. Times are the minimum over repeats (the machine is shared).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from posthoc.analyse.moe.layers import MLPRouter, MoEFFN, install_moe
from posthoc.analyse.moe.partition import expert_sizes
from posthoc.ffn import FFNWeights, ffn_weights, find_ffns


def best_ms(fn: Any, repeats: int) -> float:
    with torch.inference_mode():
        fn()
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return 1000 * min(times)


def moe_layer(w: FFNWeights, experts: int, top_k: int, seed: int = 0) -> MoEFFN:
    torch.manual_seed(seed)
    return MoEFFN(w, expert_sizes(w.d_ff, experts), 0, MLPRouter(w.d_model, experts), top_k=top_k).eval()


def ffn_blocks(repeats: int) -> list[dict[str, Any]]:
    from transformers import BertConfig, LlamaConfig
    from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput
    from transformers.models.llama.modeling_llama import LlamaMLP

    rows = []
    torch.manual_seed(0)
    bert = BertConfig(hidden_size=384, intermediate_size=1536, hidden_act="gelu")
    intermediate, output = BertIntermediate(bert).eval(), BertOutput(bert).eval()
    llama = LlamaConfig(hidden_size=576, intermediate_size=1536, hidden_act="silu")
    mlp = LlamaMLP(llama).eval()
    shapes = {
        "MiniLM (384→1536, GELU)": (lambda x: output.dense(intermediate(x)),
                                    FFNWeights(intermediate.dense.weight.detach(), output.dense.weight.detach(),
                                               intermediate.intermediate_act_fn, intermediate.dense.bias.detach(),
                                               down_bias=output.dense.bias.detach()), 384),
        "SmolLM2 (576→1536, SwiGLU)": (mlp, FFNWeights(mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach(),
                                                       mlp.act_fn, gate=mlp.gate_proj.weight.detach()), 576),
    }
    for name, (dense, w, d) in shapes.items():
        x = torch.randn(2048, d)
        dense_ms = best_ms(lambda dense=dense, x=x: dense(x), repeats)
        for top_k in (4, 8):
            layer = moe_layer(w, 16, top_k)
            moe_ms = best_ms(lambda layer=layer, x=x: layer(x), repeats)
            rows.append({"shape": name, "experts": f"{top_k}/16 ({top_k / 16:.0%})", "dense_ms": dense_ms,
                         "moe_ms": moe_ms, "speedup": dense_ms / moe_ms})
    return rows


def whole_models(repeats: int) -> list[dict[str, Any]]:
    from posthoc.assets import minilm_dir, smollm2_gguf
    from posthoc.models import load_model

    rows = []
    for name, spec, shape in (("all-MiniLM-L6-v2", minilm_dir, (16, 128)), ("SmolLM2-135M", smollm2_gguf, (8, 256))):
        model, _, _ = load_model(spec())
        body = getattr(model, "model", model)  # SmolLM2: the transformer without the LM head
        ids = torch.randint(1000, 20000, shape)
        dense_ms = best_ms(lambda body=body, ids=ids: body(input_ids=ids), repeats)
        ffns = find_ffns(model)
        for top_k in (4, 8):
            originals = []
            for i, ffn in enumerate(ffns):
                originals.append((ffn, install_moe(model, ffn, moe_layer(ffn_weights(model, ffn), 16, top_k, seed=i))))
            moe_ms = best_ms(lambda body=body, ids=ids: body(input_ids=ids), repeats)
            from posthoc.analyse.moe.layers import restore

            for _, saved in reversed(originals):
                restore(model, saved)
            rows.append({"shape": f"{name} forward, {shape[0]}×{shape[1]} tokens", "experts": f"{top_k}/16 ({top_k / 16:.0%})",
                         "dense_ms": dense_ms, "moe_ms": moe_ms, "speedup": dense_ms / moe_ms})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-models", action="store_true", help="FFN blocks only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = ffn_blocks(args.repeats) + ([] if args.no_models else whole_models(max(3, args.repeats // 3)))
    print(f"| what ({args.threads} threads, 2,048 tokens) | experts computed | dense ms | MoE ms | speed-up |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['experts']} | {r['dense_ms']:.1f} | {r['moe_ms']:.1f} | {r['speedup']:.2f}× |")


if __name__ == "__main__":
    main()
