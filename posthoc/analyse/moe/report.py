"""The HTML report of an MoE-fication: expert sizes, router recall, quality vs fraction of experts
(routers, partitions, before/after healing) and measured speed, with PNG plots."""

from __future__ import annotations

from typing import Any

from posthoc.report import Report

COLOURS = {"oracle": "#333333", "mlp": "#d62728", "centroid": "#1f77b4", "gate": "#2ca02c"}
STYLES = {"kmeans": "-", "random": ":", "coactivation": "--"}


def _metric(rows: list[dict[str, Any]]) -> tuple[str, str]:
    if rows and "perplexity" in rows[0]:
        return "perplexity_ratio", "perplexity / dense perplexity (log)"
    return "cosine", "mean embedding cosine to dense"


def build_report(moe: Any, rows: list[dict[str, Any]], dense: dict[str, float], speeds: list[dict[str, Any]],
                 *, title_model: str, held_out: str) -> Report:
    """The report of a fitted MoEfier: rows are `moefy`'s quality rows (sweeps and the "fitted" one)."""
    r = Report(f"MoE-fication of {title_model}",
               f"{moe.experts} experts, top-{moe.top_k}, {moe.partition} partition, {moe.router} router")
    _summary(r, moe, next((row for row in rows if row.get("label") == "fitted"), None), dense, held_out)
    _expert_sizes(r, moe)
    _router_recall(r, moe)
    sweep_rows = [row for row in rows if row.get("label") != "fitted"]
    if sweep_rows:
        _quality(r, moe, rows, sweep_rows)
    if moe.heal_log_ and moe.heal_log_.get("losses"):
        _healing(r, moe)
    if speeds:
        _speed(r, speeds)
    return r


def _summary(r: Report, moe: Any, fitted: dict[str, Any] | None, dense: dict[str, float], held_out: str) -> None:
    r.section("Summary")
    items: dict[str, Any] = {
        "FFNs": len(moe.ffns_),
        "FFN width": moe.ffns_ and sum(moe.sizes_[0]) + moe.shared_[0],
        "experts / top-k": f"{moe.experts} / {moe.top_k}",
        "shared neurons per FFN": moe.shared_[0],
        "partition / router / routing": f"{moe.partition} / {moe.router} / {moe.routing}",
        "neuron score": moe.score,
        "per-layer top-k": ", ".join(map(str, moe.top_k_)),
        "calibration": f"{moe.calibration_} ({moe.tokens_:,} tokens)",
        "held-out evaluation": held_out,
        "fit time (s)": ", ".join(f"{k} {v:.1f}" for k, v in moe.timings_.items()),
    }
    for key, value in dense.items():
        items[f"dense {key}"] = value
    if fitted:
        for key in ("cosine", "probe_accuracy", "probe_retained", "perplexity", "perplexity_ratio", "neurons"):
            if key in fitted:
                items[f"MoE {key}"] = fitted[key]
    r.key_values(items)
    r.note("Neuron activation score: " + ("|h|" if moe.score == "magnitude" else "|h|·‖W_down column‖")
           + " (h = input of the down projection); an expert's mass is the sum of its neurons' scores. "
           "The oracle router computes every neuron to pick the true top-k: it bounds what a router can do "
           "and is not faster than the dense model.")


def _expert_sizes(r: Report, moe: Any) -> None:
    r.section("Expert sizes per layer")
    fig, ax = r.figure_axes(height=3.0)
    for i, sizes in enumerate(moe.sizes_):
        bottom = 0
        if moe.shared_[i]:
            ax.bar(i, moe.shared_[i], color="#999999", label="shared" if i == 0 else None)
            bottom = moe.shared_[i]
        for e, size in enumerate(sizes):
            ax.bar(i, size, bottom=bottom, color=("#4c72b0" if e % 2 else "#8fb0e0"), edgecolor="white", linewidth=0.3)
            bottom += size
    ax.set_xlabel("FFN (layer)")
    ax.set_ylabel("neurons")
    if any(moe.shared_):
        ax.legend()
    r.figure(fig, "expert_sizes", "Each bar is one FFN, cut into its experts (alternating colours); grey: the "
             "always-on shared expert. When E does not divide the routed width, the first experts hold one "
             "neuron more.")


def _router_recall(r: Report, moe: Any) -> None:
    r.section("Router recall of the oracle's activation mass")
    fig, ax = r.figure_axes(height=3.0)
    kinds = sorted({k for rec in moe.recall_ for k in rec})
    for kind in kinds:
        ax.plot([rec.get(kind) for rec in moe.recall_], marker="o", label=kind, color=COLOURS.get(kind))
    ax.set_xlabel("FFN (layer)")
    ax.set_ylabel(f"recall at top-{moe.top_k}")
    ax.set_ylim(0, 1.02)
    ax.legend()
    r.figure(fig, "router_recall", "Mass of the router's top-k experts divided by the mass of the oracle's "
             "top-k, on sampled calibration tokens held out from router training.")
    r.table(["layer", *kinds], [[i, *[rec.get(k) for k in kinds]] for i, rec in enumerate(moe.recall_)])


def _quality(r: Report, moe: Any, rows: list[dict[str, Any]], sweep_rows: list[dict[str, Any]]) -> None:
    """Quality vs fraction of experts: routers of the fitted partition (left), partitions (right, with compare)."""
    metric, ylabel = _metric(sweep_rows)
    r.section("Quality vs fraction of experts")
    labels = sorted({row["label"] for row in sweep_rows})
    panels = 2 if len({lab.replace("+healed", "") for lab in labels}) > 1 else 1
    fig, axes = r.figure_axes(width=7.0 if panels == 1 else 10.0, height=3.6, ncols=panels)
    axes = [axes] if panels == 1 else list(axes)
    for label in labels:
        base = label.replace("+healed", "")
        for router in sorted({row["router"] for row in sweep_rows if row["label"] == label}):
            pts = sorted((row["fraction"], row[metric]) for row in sweep_rows
                         if row["label"] == label and row["router"] == router)
            style = STYLES.get(base, "-")
            marker = "s" if label.endswith("+healed") else "o"
            if base == moe.partition:
                axes[0].plot(*zip(*pts), style, marker=marker, color=COLOURS.get(router),
                             label=f"{router}{' healed' if label.endswith('+healed') else ''}")
            if panels == 2 and router in ("oracle", moe.router) and not label.endswith("+healed"):
                axes[1].plot(*zip(*pts), STYLES.get(base, "-"), marker="o", color=COLOURS.get(router),
                             label=f"{base} / {router}")
    for ax in axes:
        ax.set_xlabel("fraction of routed experts per token")
        ax.set_ylabel(ylabel)
        if metric == "perplexity_ratio":
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    axes[0].set_title(f"routers ({moe.partition} partition)", fontsize=10)
    if panels == 2:
        axes[1].set_title("partitions", fontsize=10)
    r.figure(fig, "quality_vs_fraction", "Held-out quality with every layer at the same top-k. "
             "Squares: after healing.")
    keys = [k for k in ("cosine", "probe_accuracy", "probe_retained", "perplexity", "perplexity_ratio")
            if k in sweep_rows[0]]
    r.table(["partition", "router", "k", "experts", "neurons", *keys],
            [[row["label"], row["router"], row["k"], row["fraction"], row["neurons"], *[row[k] for k in keys]]
             for row in rows])


def _healing(r: Report, moe: Any) -> None:
    r.section("Healing")
    log = moe.heal_log_
    r.key_values({"steps": log["steps"], "seconds": log["seconds"], "CPU seconds": log.get("cpu_seconds"),
                  "first loss": log["loss_first"], "last loss": log["loss_last"], "learning rate": moe.heal_lr,
                  "experts' learning rate": moe.heal_ffn_lr, "FFN biases trained": moe.heal_biases,
                  "hidden-state loss weight": moe.heal_hidden, "LoRA rank": moe.lora_rank})
    fig, ax = r.figure_axes(height=2.8)
    ax.plot(log["losses"])
    ax.set_xlabel("step")
    ax.set_ylabel("distillation loss")
    r.figure(fig, "healing_loss", "Distillation of the MoE layers' trained parts towards the dense model.")


def _speed(r: Report, speeds: list[dict[str, Any]]) -> None:
    r.section("Speed (CPU)")
    s = speeds[0]
    fig, ax = r.figure_axes(width=5.0, height=2.6)
    ax.barh(["dense FFN", f"MoE top-{s['top_k']}/{s['experts']}"], [s["dense_ms"], s["moe_ms"]],
            color=["#999999", "#d62728"])
    ax.set_xlabel(f"ms per call, {s['tokens']} tokens")
    r.figure(fig, "speed", f"First FFN block, median of 10 calls: {s['speedup']:.2f}x faster than dense "
             "(router, gather and scatter included).")
    r.table(["layer", "tokens", "top-k", "experts", "dense ms", "MoE ms", "speed-up"],
            [[s["layer"], s["tokens"], s["top_k"], s["experts"], s["dense_ms"], s["moe_ms"], s["speedup"]]
             for s in speeds])
