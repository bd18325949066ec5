"""Runtime MoE layers: routers, and an FFN that computes only the experts each token is routed to.

Layout. The FFN's neurons are stored expert-contiguous (the permutation MoE-fication writes into the
checkpoint): [shared | expert 0 | expert 1 | … | expert E-1], `offsets` marking the boundaries. A token
computes the shared neurons (if any) and its selected experts, nothing else:

    y = W_down,shared h_shared(x) + Σ_{e ∈ S(x)} w_e(x) · W_down,e h_e(x) + b_down
        + Σ_{e ∉ S(x)} c_e                      (compensation: calibration-mean output of skipped experts)
        + B A x                                 (optional low-rank term, LoRA-style, B initialised to 0)
    w_e(x) = 1 + α_e · σ(r_e(x))                (expert scales, α initialised to 0: trained by healing)

S(x) is the top-k experts of the router's scores r(x) ("topk"), or every expert whose score clears a
per-layer threshold calibrated to an average of k experts ("threshold": a variable number per token,
at least one). Tokens are grouped by expert: one gather, one matmul pair per expert, one scatter-add;
no dense fallback. With k = E and no compensation/LoRA, y equals the dense FFN up to float round-off.

Gate router (GLU FFNs, `GateRouter`): r(x) is computed from the FFN's own activated gates a = act(W_gate x)
of every neuron; the chosen experts then compute only their up rows and down columns and reuse a, so
nothing is computed twice (first_weight then holds all gate rows, then all up rows).

Installation. `install_moe` puts the `MoEFFN` in place of the FFN's up-projection module and turns the
gate and down projections into pass-throughs: the MoE output skips the (element-wise) activation code of
the original block, which then runs on an empty (…, 0) tensor. This works for any FFN posthoc can find
(BERT's intermediate/output split included) without rewriting model classes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from posthoc.errors import ConfigError
from posthoc.ffn import FFN, FFNWeights, get_module, neuron_scores

ROUTERS = ("centroid", "mlp", "gate", "oracle")
ROUTINGS = ("topk", "threshold")
HEALED_THRESHOLD = "healed_threshold"  # a healed router's own threshold, stored in its healing state
_WORKSPACES = threading.local()  # per thread: {key: buffer}, see MoEFFN._workspace


class CentroidRouter(nn.Module):
    """Similarity router: score_e = c_e · x, c_e the normalised mean of the expert's normalised rows."""

    def __init__(self, d: int, experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(experts, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, d) -> (T, E)
        return x @ self.weight.T


class MLPRouter(nn.Module):
    """MoEfication's MLP router: Linear(d→hidden) initialised from the centroids, tanh, Linear(hidden→E)
    initialised to the identity; its logits predict each expert's share of activation mass (sigmoid)."""

    def __init__(self, d: int, experts: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or experts
        self.first = nn.Linear(d, hidden)
        self.second = nn.Linear(hidden, experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, d) -> (T, E) logits
        return self.second(torch.tanh(self.first(x)))


class GateRouter(nn.Module):
    """Gate router of GLU FFNs (CATS / TEAL-style): the FFN's own gate projection routes. The MoE layer
    computes a = act(W_gate x) for every neuron (exact; a third of the dense FFN), this module scores each
    routed expert by Σ_{i ∈ e} |a_i| · weight_i, and the layer computes up and down only for the chosen
    experts, reusing a. weight_i is ‖W_down[:, i]‖ (output-aware; 1 with the 'magnitude' score), times the
    calibration RMS of the neuron's up projection u_i·x when fitted with `gate_up_scale` (an estimate of
    |h_i| = |a_i|·|u_i·x|·‖W_down[:, i]‖, the per-neuron oracle's score, from the gate alone).

    sizes: routed expert sizes (neurons in expert order, shared neurons excluded)."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        self.experts = len(sizes)
        self.weight = nn.Parameter(torch.ones(sum(sizes)))  # (routed neurons,)
        self.register_buffer("index", torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)),
                             persistent=False)

    def forward(self, a: torch.Tensor) -> torch.Tensor:  # (T, routed neurons) activated gates -> (T, E)
        s = a.abs() * self.weight.to(a.dtype)
        return s.new_zeros(s.shape[0], self.experts).index_add_(1, self.index, s)


def make_router(kind: str, d: int, experts: int, hidden: int | None = None, sizes: list[int] | None = None
                ) -> nn.Module | None:
    if kind == "gate":
        return GateRouter(sizes if sizes is not None else [1] * experts)
    if kind == "centroid":
        return CentroidRouter(d, experts)
    if kind == "mlp":
        return MLPRouter(d, experts, hidden)
    if kind == "oracle":
        return None
    raise ConfigError(f"router {kind!r} is unknown; use one of {', '.join(ROUTERS)}")


class MoEFFN(nn.Module):
    """An FFN split into a shared expert and E routed experts (see the module docstring).

    weights: the FFN's weights already in expert-contiguous order; sizes: routed expert sizes;
    shared: number of always-on neurons (first in the order).
    """

    def __init__(
        self,
        weights: FFNWeights,
        sizes: list[int],
        shared: int,
        router: nn.Module | None,
        *,
        top_k: int,
        routing: str = "topk",
        threshold: float | None = None,
        score: str = "magnitude",
        lora_rank: int = 0,
    ):
        super().__init__()
        self.experts = len(sizes)
        self.d_model, self.d_ff = weights.d_model, weights.d_ff
        if sum(sizes) + shared != self.d_ff:
            raise ConfigError(f"expert sizes {sum(sizes)} + shared {shared} != FFN width {self.d_ff}")
        self.sizes, self.shared = list(sizes), shared
        self.offsets = [shared]
        for s in sizes:
            self.offsets.append(self.offsets[-1] + s)
        self.act = weights.act
        self.glu = weights.gate is not None
        self.score = score
        self.gated = isinstance(router, GateRouter)  # gate router: gate rows of every neuron, then up rows
        if self.gated and not self.glu:
            raise ConfigError("--router gate needs GLU FFNs (gate_proj/up_proj/down_proj, e.g. Llama's SwiGLU); "
                              "this FFN has no gate projection: use --router mlp")
        # The first matrix, block by block (shared, expert 0, …): [gate rows; up rows] of the block for GLU
        # FFNs, up rows otherwise, so every expert's first matrix is one contiguous slice of rows
        # [first_start[e], first_start[e+1]) and each expert costs two plain matmuls.
        blocks = [(0, shared)] + [(self.offsets[e], self.offsets[e + 1]) for e in range(self.experts)]
        rows, stacked_w, stacked_b = self._first_matrix(weights, blocks)
        self.first_weight = nn.Parameter(stacked_w[rows].contiguous(), requires_grad=False)
        self.first_bias = None if stacked_b is None else nn.Parameter(stacked_b[rows].contiguous(), requires_grad=False)
        # where neuron i's gate and up rows sit in first_weight (for computing every neuron at once)
        position = torch.empty_like(rows)
        position[rows] = torch.arange(len(rows))
        self.register_buffer("gate_rows", position[: self.d_ff] if self.glu else position, persistent=False)
        self.register_buffer("up_rows", position[self.d_ff :] if self.glu else position, persistent=False)
        width = 2 if self.glu else 1
        self.first_start = [width * lo for lo, _ in blocks] + [width * self.d_ff]
        self.down_t = nn.Parameter(weights.down.T.contiguous(), requires_grad=False)  # (d_ff, d)
        self.down_bias = None if weights.down_bias is None else nn.Parameter(weights.down_bias.clone(), requires_grad=False)
        self.router = router
        self.alpha = nn.Parameter(torch.zeros(self.experts), requires_grad=False)  # expert scales (healing)
        self.register_buffer("compensation", torch.zeros(self.experts, self.d_model))  # c_e
        self.use_compensation = False
        self.lora_a = nn.Parameter(torch.randn(lora_rank, self.d_model) * (1 / self.d_model**0.5)) if lora_rank else None
        self.lora_b = nn.Parameter(torch.zeros(self.d_model, lora_rank)) if lora_rank else None
        self.set_routing(top_k=top_k, routing=routing, threshold=threshold)
        self.dense = False  # True: compute every neuron (the dense FFN), for teachers and checks
        self.masked = False  # gate router only: the chosen experts' function computed densely (evaluation)
        self.seen = [0, 0]  # tokens routed, (token, expert) pairs computed: the measured experts per token

    def _first_matrix(self, weights: FFNWeights, blocks: list[tuple[int, int]]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(rows, stacked weight, stacked bias): first_weight is stacked[rows] (see __init__)."""
        if not self.glu:
            return torch.arange(self.d_ff), weights.up, weights.up_bias
        if self.gated:  # [all gate rows | all up rows]: the router reads every gate, experts slice the up rows
            rows = torch.arange(2 * self.d_ff)
        else:
            rows = torch.cat([torch.arange(lo, hi) + j * self.d_ff for lo, hi in blocks for j in (0, 1)])
        stacked_w = torch.cat([weights.gate, weights.up], 0)
        if weights.gate_bias is None and weights.up_bias is None:
            return rows, stacked_w, None
        zeros = torch.zeros(self.d_ff)
        stacked_b = torch.cat([weights.gate_bias if weights.gate_bias is not None else zeros,
                               weights.up_bias if weights.up_bias is not None else zeros])
        return rows, stacked_w, stacked_b

    # ------------------------------------------------------------------------------------ settings

    def set_routing(self, *, top_k: int | None = None, routing: str | None = None, threshold: float | None = None) -> None:
        if top_k is not None:
            if not 1 <= top_k <= self.experts:
                raise ConfigError(f"The 'top_k' parameter must be an int in [1, experts={self.experts}]. Got {top_k} instead.")
            self.top_k = int(top_k)
        if routing is not None:
            if routing not in ROUTINGS:
                raise ConfigError(f"routing {routing!r} is unknown; use one of {', '.join(ROUTINGS)}")
            self.routing = routing
        if threshold is not None or routing == "topk":
            self.threshold = threshold
        if self.routing == "threshold" and self.threshold is None:
            raise ConfigError("threshold routing needs a calibrated threshold (fit with routing='threshold')")

    # ------------------------------------------------------------------------------------ pieces

    def _rows(self, block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """First-matrix rows (and bias) of block 0 = shared, 1 + e = expert e."""
        lo, hi = self.first_start[block], self.first_start[block + 1]
        return self.first_weight[lo:hi], None if self.first_bias is None else self.first_bias[lo:hi]

    def _hidden(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        pre = torch.addmm(b, x, w.T) if b is not None else x @ w.T
        if not self.glu:
            return self.act(pre)
        gate, up = pre.chunk(2, dim=-1)
        return self.act(gate) * up

    def hidden_all(self, x: torch.Tensor) -> torch.Tensor:
        """Every neuron's activation (T, d_ff), in the stored order (dense; oracle and checks only)."""
        pre = x @ self.first_weight.T
        if self.first_bias is not None:
            pre = pre + self.first_bias
        if not self.glu:
            return self.act(pre)
        return self.act(pre[:, self.gate_rows]) * pre[:, self.up_rows]

    def expert_mass(self, h: torch.Tensor) -> torch.Tensor:
        """Activation mass per routed expert (T, E) from all neurons' activations (T, d_ff)."""
        s = neuron_scores(h[:, self.shared :], self.down_t[self.shared :].norm(dim=1), self.score)
        index = torch.repeat_interleave(torch.arange(self.experts, device=h.device), torch.tensor(self.sizes))
        return torch.zeros(h.shape[0], self.experts, dtype=s.dtype).index_add_(1, index, s)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Activated gates a = act(W_gate x + b) of every neuron (T, d_ff), stored order (gate router only)."""
        w = self.first_weight[: self.d_ff]
        b = None if self.first_bias is None else self.first_bias[: self.d_ff]
        return self.act(torch.addmm(b, x, w.T) if b is not None else x @ w.T)

    def router_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(T, E): higher means more useful. The oracle computes the true masses (every neuron)."""
        if self.router is None:
            return self.expert_mass(self.hidden_all(x))
        if self.gated:
            return self.router(self.gates(x)[:, self.shared :])
        return self.router(x)

    def select(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token index, expert index) pairs, each (P,), of the experts computed."""
        t = scores.shape[0]
        if self.routing == "topk" or self.top_k == self.experts:
            experts = scores.topk(self.top_k, dim=1).indices  # (T, k)
            tokens = torch.arange(t, device=scores.device)[:, None].expand_as(experts)
            return tokens.reshape(-1), experts.reshape(-1)
        normalised = unit_scores(self, scores)  # (T, E) in [0, 1], per-token max = 1
        chosen = normalised >= self.threshold
        chosen[torch.arange(t), normalised.argmax(1)] = True  # at least one expert
        tokens, experts = chosen.nonzero(as_tuple=True)
        return tokens, experts

    # ------------------------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.dense:
            y = self.hidden_all(x2) @ self.down_t
            if self.down_bias is not None:
                y = y + self.down_bias
            return y.reshape(*shape[:-1], self.d_model)
        y = self._moe(x2)
        return y.reshape(*shape[:-1], self.d_model)

    def _moe(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self._moe_gated(x)
        t = x.shape[0]
        if self.down_bias is not None:
            y = self.down_bias.expand(t, -1).clone()
        else:
            y = x.new_zeros(t, self.d_model)
        if self.shared:
            h = self._hidden(x, *self._rows(0))
            y = torch.addmm(y, h, self.down_t[: self.shared])
        scores = self.router_scores(x)  # (T, E)
        tokens, experts = self._select_counted(scores)
        y, tokens, experts = self._grouped(
            x, y, scores, tokens, experts, lambda e, xs, rows: self._hidden(xs, *self._rows(e + 1))
        )
        return self._extras(x, y, tokens, experts)

    def _moe_gated(self, x: torch.Tensor) -> torch.Tensor:
        """The gate router's forward: every gate once, the router scores from them, then per chosen expert
        only the up rows and the down columns (the gate values are gathered, not recomputed).

        Cost per token: d·d_ff (gates) + the router's d_ff + 2·d·(neurons of the chosen experts): at a
        fraction f of the neurons, 1/3 + 2/3·f of the dense FFN's matmuls."""
        t, d_ff = x.shape[0], self.d_ff
        up_w = self.first_weight[d_ff:]
        up_b = None if self.first_bias is None else self.first_bias[d_ff:]
        a = self.gates(x)  # (T, d_ff)
        y = self.down_bias.expand(t, -1).clone() if self.down_bias is not None else x.new_zeros(t, self.d_model)
        if self.shared:
            u = x @ up_w[: self.shared].T
            if up_b is not None:
                u = u + up_b[: self.shared]
            y = torch.addmm(y, a[:, : self.shared] * u, self.down_t[: self.shared])
        scores = self.router(a[:, self.shared :])  # (T, E)
        tokens, experts = self._select_counted(scores)
        if self.masked:
            y, chosen = self._masked_experts(x, y, a, up_w, up_b, scores, tokens, experts)
            return self._extras(x, y, tokens, experts, chosen)

        def hidden(e: int, xs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            lo, hi = self.offsets[e], self.offsets[e + 1]
            u = xs @ up_w[lo:hi].T
            if up_b is not None:
                u = u + up_b[lo:hi]
            return a[:, lo:hi].index_select(0, rows) * u  # the gates computed once, gathered for these tokens

        y, tokens, experts = self._grouped(x, y, scores, tokens, experts, hidden)
        chosen = None
        if self.use_compensation:  # Σ_{e∉S} c_e as one (T, E) @ (E, d) matmul, not a (P, d) gather
            chosen = torch.zeros(t, self.experts, dtype=x.dtype)
            chosen[tokens, experts] = 1
        return self._extras(x, y, tokens, experts, chosen)

    def _select_counted(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`select`, counting tokens routed and (token, expert) pairs computed (`seen`)."""
        tokens, experts = self.select(scores)
        self.seen[0] += scores.shape[0]
        self.seen[1] += len(tokens)
        return tokens, experts

    def _weighted(self) -> bool:
        """Whether the expert scales (1 + α_e·σ(r_e)) apply: they are trained, or some α is nonzero."""
        return (self.alpha.requires_grad and torch.is_grad_enabled()) or bool(self.alpha.detach().abs().sum() > 0)

    def _grouped(
        self, x: torch.Tensor, y: torch.Tensor, scores: torch.Tensor, tokens: torch.Tensor, experts: torch.Tensor,
        hidden: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """y plus every chosen (token, expert) pair's output, grouped by expert: one gather of the inputs,
        per expert `hidden(e, its tokens' inputs, its tokens)` (the down projection's input) and one
        matmul, one scatter-add. Returns y and the pairs in expert order."""
        order = experts.argsort(stable=True)
        tokens, experts = tokens[order], experts[order]
        counts = torch.bincount(experts, minlength=self.experts).tolist()
        weighted = self._weighted()
        if weighted:
            gate = 1 + self.alpha[experts] * torch.sigmoid(scores[tokens, experts])  # (P,)
        # Inference writes the gathered inputs and the expert outputs into buffers kept between calls: a
        # fresh (P, d) tensor per call costs as much as the expert matmuls (page faults of a new mapping).
        reuse = not torch.is_grad_enabled()
        p = len(tokens)
        if reuse:
            xs = torch.index_select(x, 0, tokens, out=self._workspace("xs", p, x))  # (P, d), grouped by expert
            outs = self._workspace("out", p, x)  # (P, d)
        else:
            xs, parts = x.index_select(0, tokens), []
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            lo, hi = self.offsets[e], self.offsets[e + 1]
            h = hidden(e, xs[start : start + n], tokens[start : start + n])
            if reuse:
                out = torch.mm(h, self.down_t[lo:hi], out=outs[start : start + n])
                if weighted:
                    out.mul_(gate[start : start + n, None])
            else:
                out = h @ self.down_t[lo:hi]
                parts.append(out * gate[start : start + n, None] if weighted else out)
            start += n
        if p:
            y = y.index_add(0, tokens, outs if reuse else torch.cat(parts))
        return y, tokens, experts

    def _masked_experts(self, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, up_w: torch.Tensor,
                        up_b: torch.Tensor | None, scores: torch.Tensor, tokens: torch.Tensor, experts: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same function as the grouped kernel, computed densely with a (T, routed neurons) mask: for
        evaluating very fine experts (a few neurons each), where gathering every token's input once per
        chosen expert costs more than the dense matmuls. No speed-up: evaluation only (`kernel='masked'`)."""
        lo = self.shared
        u = x @ up_w[lo:].T
        if up_b is not None:
            u = u + up_b[lo:]
        chosen = torch.zeros(x.shape[0], self.experts, dtype=a.dtype)
        chosen[tokens, experts] = 1
        weighted = self._weighted()
        scale = chosen * (1 + self.alpha * torch.sigmoid(scores)) if weighted else chosen  # (T, E)
        neuron_mask = scale[:, self.router.index]  # (T, routed neurons)
        return y + (a[:, lo:] * u * neuron_mask) @ self.down_t[lo:], chosen

    def _extras(self, x: torch.Tensor, y: torch.Tensor, tokens: torch.Tensor, experts: torch.Tensor,
                chosen: torch.Tensor | None = None) -> torch.Tensor:
        """Compensation of the skipped experts and the low-rank term. With `chosen`, the (T, E) 0/1 choice
        matrix, Σ_{e∉S} c_e is one (T, E) @ (E, d) matmul (gate router: a (P, d) gather would be gigabytes
        with hundreds of small experts, P = T·k pairs); else Σ_e c_e − Σ_{e∈S} c_e by a gather."""
        if self.use_compensation and chosen is not None:
            y = y + (1 - chosen) @ self.compensation
        elif self.use_compensation:
            skipped = self.compensation.sum(0).expand(x.shape[0], -1) - torch.zeros_like(y).index_add_(
                0, tokens, self.compensation[experts]
            )
            y = y + skipped
        if self.lora_a is not None:
            y = y + (x @ self.lora_a.T) @ self.lora_b.T
        return y

    def _workspace(self, name: str, rows: int, like: torch.Tensor) -> torch.Tensor:
        """A (rows, d_model) buffer kept between inference calls and shared by every MoE layer (they run one
        after the other), grown when a call needs more. One per thread, so concurrent forwards stay apart;
        inference tensors cannot be written outside inference mode, so one for each mode too."""
        key = (name, self.d_model, like.dtype, like.device, torch.is_inference_mode_enabled())
        if not hasattr(_WORKSPACES, "buffers"):
            _WORKSPACES.buffers = {}
        buffer = _WORKSPACES.buffers.get(key)
        if buffer is None or buffer.shape[0] < rows:
            buffer = torch.empty(max(rows, 1), self.d_model, dtype=like.dtype, device=like.device)
            _WORKSPACES.buffers[key] = buffer
        return buffer[:rows]

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, experts={self.experts}, shared={self.shared}, "
                f"top_k={self.top_k}, routing={self.routing}, router={type(self.router).__name__ if self.router else 'oracle'}")


def unit_scores(layer: MoEFFN, scores: torch.Tensor) -> torch.Tensor:
    """Router scores mapped to [0, 1] with each token's best expert at 1 (threshold routing's scale):
    the MLP router's predicted masses (sigmoid of its logits), the gate router's estimated masses and the
    oracle's true masses are divided
    by the token's largest; centroid similarities are min-max scaled per token."""
    if layer.router is None or isinstance(layer.router, (MLPRouter, GateRouter)):
        s = torch.sigmoid(scores) if isinstance(layer.router, MLPRouter) else scores
    else:
        s = scores - scores.min(dim=1, keepdim=True).values
    return s / s.max(dim=1, keepdim=True).values.clamp(min=1e-12)


# ------------------------------------------------------------------------------------------ install


class _Empty(nn.Module):
    """Stands where a gate projection was: the MoE output bypasses it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], 0)


class _Front(nn.Module):
    """Stands where the up projection was: computes the MoE output and hands it to `_Back`."""

    def __init__(self, moe: MoEFFN):
        super().__init__()
        self.moe = moe
        self._pending: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._pending.append(self.moe(x))
        return x.new_empty(*x.shape[:-1], 0)


class _Back(nn.Module):
    """Stands where the down projection was: returns the output `_Front` computed for the same call."""

    def __init__(self, front: _Front):
        super().__init__()
        self.__dict__["front"] = front  # not a submodule: the parameters live once, at the front

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.shape[-1] != 0 or not self.front._pending:
            raise RuntimeError("MoE pass-through called out of order (the FFN code does more than up→act→down)")
        return self.front._pending.pop()


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def install_moe(model: nn.Module, ffn: FFN, moe: MoEFFN) -> dict[str, nn.Module]:
    """Replace one FFN's projections by `moe` (see the module docstring); returns the originals."""
    originals = {ffn.up: get_module(model, ffn.up), ffn.down: get_module(model, ffn.down)}
    if ffn.gate:
        originals[ffn.gate] = get_module(model, ffn.gate)
        _set_module(model, ffn.gate, _Empty())
    front = _Front(moe)
    _set_module(model, ffn.up, front)
    _set_module(model, ffn.down, _Back(front))
    return originals


def restore(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    for path, module in originals.items():
        _set_module(model, path, module)


def moe_layers(model: nn.Module) -> list[MoEFFN]:
    """Every installed MoE layer, in model order."""
    return [m.moe for m in model.modules() if isinstance(m, _Front)]


def set_routing(model: nn.Module, **kwargs: Any) -> None:
    """Change top_k / routing / threshold of every MoE layer (e.g. to sweep the fraction of experts)."""
    for layer in moe_layers(model):
        layer.set_routing(**kwargs)


def calibrate_threshold(unit: torch.Tensor, k: float) -> float:
    """Threshold τ on per-token unit scores (T, E) such that the mean of max(1, #{u >= τ}) is about k."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        count = (unit >= mid).sum(1).clamp(min=1).float().mean().item()
        if count > k:
            lo = mid
        else:
            hi = mid
    return hi
