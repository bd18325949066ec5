"""The one streaming activation collector every analyser uses, and neuron interventions (masks, edits).

    from posthoc.analyse.activations import collect, Moments, CoActivation, LabelSums, InputSample

    acts = collect(model, "bbc:train", [Moments(), CoActivation(top_fraction=0.1)], tokenizer=tok,
                   max_tokens=50_000)
    acts.result(0, "moments")["mean_abs"]          # (d_ff,) for the first FFN
    acts.result(0, "coactivation")["counts"]       # (d_ff, d_ff)

Texts are tokenised and streamed through the model in batches; forward hooks on every FFN catch its
input x (tokens, d) and its neuron activations h (tokens, d_ff) (the input of the down projection, see
`posthoc.ffn`), drop padding tokens, and hand both to each *statistic* of that FFN. A statistic
keeps running sums only (sums, sums of squares, sums of outer products, bounded samples), so memory
does not grow with the number of tokens: a (tokens × d_ff) matrix is never kept. Forward passes stop at
the last FFN that is watched (a decoder's LM head is never run).

Adding a statistic: subclass `Statistic`, give it a `name`, allocate in `start(ffn, weights)`, add one
batch in `update(x, h, info)`, return tensors from `result()`. `collect` deep-copies the prototype you
pass once per FFN, so one instance describes what to accumulate for every layer.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from posthoc.analyse.base import frozen
from posthoc.analyse.calibration import CalibrationData, TokenBatch, is_causal_lm, token_batches
from posthoc.errors import ConfigError, DataError
from posthoc.ffn import FFN, FFNWeights, ffn_weights, find_ffns, neuron_scores
from posthoc.progress import progress_bar
from posthoc.threads import torch_threads

# ------------------------------------------------------------------------------------------ statistics


@dataclass
class TokenInfo:
    """What a statistic knows about the tokens of one update besides x and h."""

    labels: torch.Tensor | None  # (tokens,) long: the label of the text each token comes from, or None
    seen: int  # tokens already accumulated before this batch


class Statistic:
    """Accumulates one quantity of one FFN over the token stream, in memory independent of its length.

    Subclasses set `name`, and `needs_input = True` when they read the FFN input x (otherwise x is not
    captured at all). `min_tokens` is how many tokens the result needs to mean anything.
    """

    name: ClassVar[str] = "statistic"
    needs_input: ClassVar[bool] = False
    min_tokens: int = 1

    def __init__(self, *, name: str | None = None):
        if name is not None:
            self.name = name  # type: ignore[misc]  (two differently configured copies of one class)

    def start(self, ffn: FFN, weights: FFNWeights) -> None:
        """Allocate accumulators for this FFN (called once, on the per-FFN copy)."""

    def update(self, x: torch.Tensor | None, h: torch.Tensor, info: TokenInfo) -> None:
        """Add one batch: x (tokens, d) or None, h (tokens, d_ff) float32, padding already removed."""
        raise NotImplementedError

    def result(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The parameters that define this statistic (saved with the results)."""
        return {k: v for k, v in vars(self).items() if not isinstance(v, torch.Tensor) and not k.startswith("_")}


class Moments(Statistic):
    """Per neuron: mean h, mean |h|, mean h², fraction of tokens with h > 0; per input dim: mean x.

    Results: count (1,), mean, mean_abs, mean_sq, std, positive_fraction (d_ff,), mean_score (d_ff,):
    mean of the 'output' neuron score |h|·‖W_down[:, i]‖, input_mean (d,).
    """

    name = "moments"
    needs_input = True

    def start(self, ffn: FFN, weights: FFNWeights) -> None:
        d_ff, d = weights.d_ff, weights.d_model
        self.n = 0
        self.sum, self.sum_abs, self.sum_sq, self.positive = (torch.zeros(d_ff, dtype=torch.float64) for _ in range(4))
        self.sum_x = torch.zeros(d, dtype=torch.float64)
        self.down_norms = weights.down_norms().double()

    def update(self, x: torch.Tensor | None, h: torch.Tensor, info: TokenInfo) -> None:
        self.n += h.shape[0]
        self.sum += h.sum(0, dtype=torch.float64)
        self.sum_abs += h.abs().sum(0, dtype=torch.float64)
        self.sum_sq += h.square().sum(0, dtype=torch.float64)
        self.positive += (h > 0).sum(0)
        self.sum_x += x.sum(0, dtype=torch.float64)

    def result(self) -> dict[str, torch.Tensor]:
        n = max(self.n, 1)
        mean, mean_sq = self.sum / n, self.sum_sq / n
        return {
            "count": torch.tensor([self.n], dtype=torch.float64),
            "mean": mean,
            "mean_abs": self.sum_abs / n,
            "mean_sq": mean_sq,
            "std": (mean_sq - mean.square()).clamp(min=0).sqrt(),
            "positive_fraction": self.positive / n,
            "mean_score": self.sum_abs / n * self.down_norms,
            "input_mean": self.sum_x / n,
        }


class ActiveCounts(Statistic):
    """How often each neuron is *active* on a token, with active defined by one of
    - `threshold`: score > threshold (threshold=0 with score='magnitude' on ReLU is MoEfication's h > 0);
    - `top_fraction`: the neuron is among the token's ceil(top_fraction·d_ff) highest scores (CMoE);
    - neither: h > 0.
    `score` is 'magnitude' or 'output' (see `posthoc.ffn.neuron_scores`).
    Results: count (1,), active (d_ff,): number of tokens on which each neuron was active.
    """

    name = "active"

    def __init__(
        self, *, top_fraction: float | None = None, threshold: float | None = None, score: str = "magnitude",
        name: str | None = None,
    ):
        super().__init__(name=name)
        if top_fraction is not None and not 0 < top_fraction <= 1:
            raise ConfigError(f"top_fraction must be in (0, 1], got {top_fraction}")
        if top_fraction is not None and threshold is not None:
            raise ConfigError("give top_fraction or threshold, not both")
        self.top_fraction, self.threshold, self.score = top_fraction, threshold, score

    def start(self, ffn: FFN, weights: FFNWeights) -> None:
        self.n = 0
        self.active = torch.zeros(weights.d_ff, dtype=torch.float64)
        self.down_norms = weights.down_norms()

    def markers(self, h: torch.Tensor) -> torch.Tensor:
        """(tokens, d_ff) float 0/1: which neurons are active on each token."""
        if self.top_fraction is None and self.threshold is None:
            return (h > 0).float()
        s = neuron_scores(h, self.down_norms, self.score)
        if self.threshold is not None:
            return (s > self.threshold).float()
        k = max(1, math.ceil(self.top_fraction * h.shape[1]))
        marks = torch.zeros_like(h)
        return marks.scatter_(1, s.topk(k, dim=1).indices, 1.0)

    def update(self, x: torch.Tensor | None, h: torch.Tensor, info: TokenInfo) -> None:
        b = self.markers(h)
        self.n += h.shape[0]
        self.active += b.sum(0, dtype=torch.float64)

    def result(self) -> dict[str, torch.Tensor]:
        return {"count": torch.tensor([self.n], dtype=torch.float64), "active": self.active}


class CoActivation(ActiveCounts):
    """ActiveCounts plus the co-activation counts of every neuron pair: counts[i, j] = number of tokens on
    which i and j are both active (Bᵀ B summed over batches, B the 0/1 markers). The matrix is float32
    (exact for counts below 2²⁴ ≈ 16.7 M tokens; switched to float64 beyond that).
    Results: count, active, counts (d_ff, d_ff).
    """

    name = "coactivation"
    min_tokens = 64

    def start(self, ffn: FFN, weights: FFNWeights) -> None:
        super().start(ffn, weights)
        self.counts = torch.zeros(weights.d_ff, weights.d_ff, dtype=torch.float32)

    def update(self, x: torch.Tensor | None, h: torch.Tensor, info: TokenInfo) -> None:
        b = self.markers(h)
        self.n += h.shape[0]
        self.active += b.sum(0, dtype=torch.float64)
        if self.n >= 2**24 and self.counts.dtype == torch.float32:
            self.counts = self.counts.double()
        self.counts += (b.T @ b).to(self.counts.dtype)

    def result(self) -> dict[str, torch.Tensor]:
        return {**super().result(), "counts": self.counts}


class SecondMoments(Statistic):
    """Sums of products of neuron values v (v = h, |h|, or the 'output' score): Σ v, Σ vᵀv over tokens.

    Results: count, mean (d_ff,), second (d_ff, d_ff) = E[v vᵀ], covariance, correlation (d_ff, d_ff).
    float64 accumulators (d_ff² · 8 bytes per FFN: 19 MB at d_ff 1536).
    """

    name = "second_moments"
    min_tokens = 16
    OF = ("h", "abs", "output")

    def __init__(self, *, of: str = "h", name: str | None = None):
        super().__init__(name=name)
        if of not in self.OF:
            raise ConfigError(f"SecondMoments(of=...) must be one of {', '.join(self.OF)}, got {of!r}")
        self.of = of

    def start(self, ffn: FFN, weights: FFNWeights) -> None:
        self.n = 0
        self.sum = torch.zeros(weights.d_ff, dtype=torch.float64)
        self.products = torch.zeros(weights.d_ff, weights.d_ff, dtype=torch.float64)
        self.down_norms = weights.down_norms()

    def update(self, x: torch.Tensor | None, h: torch.Tensor, info: TokenInfo) -> None:
        v = h if self.of == "h" else neuron_scores(h, self.down_norms, "magnitude" if self.of == "abs" else "output")
        self.n += v.shape[0]
        self.sum += v.sum(0, dtype=torch.float64)
        self.products += (v.T @ v).double()  # float32 product per batch, float64 running sum

    def result(self) -> dict[str, torch.Tensor]:
        n = max(self.n, 1)
        mean = self.sum / n
        second = self.products / n
        cov = second - torch.outer(mean, mean)
        std = cov.diagonal().clamp(min=0).sqrt()
        corr = cov / torch.outer(std, std).clamp(min=1e-12)
        return {"count": torch.tensor([self.n], dtype=torch.float64), "mean": mean, "second": second,
                "covariance": cov, "correlation": corr}


class LabelSums(Statistic):
    """Per label (of the text a token comes from): Σ h, Σ |h| and token counts. Needs labelled data.

    Results: tokens (labels,), sum, sum_abs (labels, d_ff); mean, mean_abs (labels, d_ff).
    """

    name = "label_sums"

    def __init__(self, num_labels: int, *, name: str | None = None):
        super().__init__(name=name)
        if num_labels < 1:
            raise ConfigError(f"LabelSums needs num_labels >= 1, got {num_labels}")
        self.num_labels = num_labels

    def start(self, ffn: FFN, weights: FFNWeights) -> None:
        self.tokens = torch.zeros(self.num_labels, dtype=torch.float64)
        self.sum = torch.zeros(self.num_labels, weights.d_ff, dtype=torch.float64)
        self.sum_abs = torch.zeros(self.num_labels, weights.d_ff, dtype=torch.float64)

    def update(self, x: torch.Tensor | None, h: torch.Tensor, info: TokenInfo) -> None:
        if info.labels is None:
            raise DataError("LabelSums needs labelled calibration data (e.g. 'bbc', 'folders:DIR', a label column)")
        one_hot = nn.functional.one_hot(info.labels, self.num_labels).double()  # (tokens, labels)
        self.tokens += one_hot.sum(0)
        self.sum += one_hot.T @ h.double()
        self.sum_abs += one_hot.T @ h.abs().double()

    def result(self) -> dict[str, torch.Tensor]:
        n = self.tokens.clamp(min=1)[:, None]
        return {"tokens": self.tokens, "sum": self.sum, "sum_abs": self.sum_abs, "mean": self.sum / n,
                "mean_abs": self.sum_abs / n}


class InputSample(Statistic):
    """A uniform sample (reservoir sampling, seeded) of at most `max_tokens` FFN inputs x.

    What router training and layer-wise healing need: h and the dense FFN output are recomputed from x
    and the weights, so only (max_tokens, d) floats are kept. Results: x (n, d), index (n,): the position
    of each sampled token in the stream.
    """

    name = "inputs"
    needs_input = True

    def __init__(self, max_tokens: int = 20_000, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                 name: str | None = None):
        super().__init__(name=name)
        if max_tokens < 1:
            raise ConfigError(f"InputSample needs max_tokens >= 1, got {max_tokens}")
        self.max_tokens, self.seed, self.dtype = max_tokens, seed, dtype

    def config(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "seed": self.seed, "dtype": str(self.dtype)}

    def start(self, ffn: FFN, weights: FFNWeights) -> None:
        self.x = torch.empty(0, weights.d_model, dtype=self.dtype)
        self.index = torch.empty(0, dtype=torch.long)
        self._generator = torch.Generator().manual_seed(self.seed)  # same seed per FFN: same tokens everywhere

    def update(self, x: torch.Tensor | None, h: torch.Tensor, info: TokenInfo) -> None:
        positions = torch.arange(info.seen, info.seen + x.shape[0])
        room = self.max_tokens - self.x.shape[0]
        if room > 0:  # fill first
            self.x = torch.cat([self.x, x[:room].to(self.dtype)])
            self.index = torch.cat([self.index, positions[:room]])
            x, positions = x[room:], positions[room:]
        if x.shape[0] == 0:
            return
        # Algorithm R, vectorised: token t (0-based stream position p) replaces slot r ~ U[0, p] if r < max
        r = (torch.rand(x.shape[0], generator=self._generator, dtype=torch.float64) * (positions + 1)).long()
        keep = r < self.max_tokens
        slots, x, positions = r[keep], x[keep], positions[keep]
        # Later tokens overwrite earlier ones on clashes, as in order: only each slot's last token is written. An
        # assignment with repeated indices leaves the winner to whichever thread writes last (on 2 threads the
        # sample, and so an MoE-fication, changed from run to run), so the clashes are resolved here.
        last = torch.full((self.max_tokens,), -1, dtype=torch.long).scatter_reduce_(
            0, slots, torch.arange(len(slots)), "amax")
        winners = last[last >= 0]
        self.x[slots[winners]] = x[winners].to(self.dtype)
        self.index[slots[winners]] = positions[winners]

    def result(self) -> dict[str, torch.Tensor]:
        return {"x": self.x, "index": self.index}


STATISTICS: dict[str, type[Statistic]] = {
    cls.name: cls for cls in (Moments, ActiveCounts, CoActivation, SecondMoments, LabelSums, InputSample)
}


# ----------------------------------------------------------------------------------------- collection


@dataclass
class Activations:
    """What `collect` gathered: per watched FFN, one finished statistic per name."""

    ffns: list[FFN]  # the watched FFNs (a subset of the model's when `layers` was given)
    statistics: list[dict[str, Statistic]]  # aligned with ffns
    tokens: int  # real (non-padding) tokens streamed
    source: str = ""
    _results: dict[tuple[int, str], dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def _position(self, layer: int) -> int:
        for i, ffn in enumerate(self.ffns):
            if ffn.index == layer:
                return i
        raise KeyError(f"FFN {layer} was not watched; watched: {[f.index for f in self.ffns]}")

    def statistic(self, layer: int, name: str) -> Statistic:
        """The accumulated statistic `name` of FFN number `layer` (its `FFN.index`)."""
        stats = self.statistics[self._position(layer)]
        if name not in stats:
            raise KeyError(f"no statistic {name!r}; collected: {sorted(stats)}")
        return stats[name]

    def result(self, layer: int, name: str) -> dict[str, torch.Tensor]:
        key = (layer, name)
        if key not in self._results:
            self._results[key] = self.statistic(layer, name).result()
        return self._results[key]

    def save(self, path: str | os.PathLike[str]) -> Path:
        """All results as one safetensors file + a JSON sidecar (what was collected, on how many tokens)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {}
        for ffn, stats in zip(self.ffns, self.statistics):
            for name in stats:
                for key, value in self.result(ffn.index, name).items():
                    tensors[f"{ffn.index}.{name}.{key}"] = value.contiguous()
        meta = {
            "tokens": self.tokens,
            "source": self.source,
            "ffns": [f.describe() for f in self.ffns],
            "statistics": {name: {"class": type(s).__name__, **_jsonable(s.config())}
                           for name, s in (self.statistics[0].items() if self.statistics else [])},
        }
        save_file(tensors, str(path.with_suffix(".safetensors")), metadata={"format": "pt"})
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
        return path.with_suffix(".safetensors")

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: nn.Module, *, ffn_modules: str | dict[str, str] | None = None
             ) -> Activations:
        """Activations saved by `save`, for `model` (its FFNs are found again and matched by index):
        each statistic comes back frozen, with its saved results (no further updates)."""
        meta, results = cls.load_results(path)
        ffns = {f.index: f for f in find_ffns(model, ffn_modules)}
        watched = [ffns[i] for i in sorted(results)]
        stats = [{name: _Frozen(name, res) for name, res in results[f.index].items()} for f in watched]
        return cls(watched, stats, int(meta["tokens"]), meta.get("source", ""))

    @staticmethod
    def load_results(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[int, dict[str, dict[str, torch.Tensor]]]]:
        """(metadata, {ffn index: {statistic name: {key: tensor}}}) from `save`'s files."""
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        out: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        for full, tensor in load_file(str(path.with_suffix(".safetensors"))).items():
            layer, name, key = full.split(".", 2)
            out.setdefault(int(layer), {}).setdefault(name, {})[key] = tensor
        return meta, out


class _Frozen(Statistic):
    """A statistic restored from disk: returns its saved results."""

    def __init__(self, name: str, results: dict[str, torch.Tensor]):
        super().__init__(name=name)
        self._saved = results

    def update(self, x: torch.Tensor | None, h: torch.Tensor, info: TokenInfo) -> None:
        raise RuntimeError(f"statistic {self.name!r} was loaded from disk and cannot be updated")

    def result(self) -> dict[str, torch.Tensor]:
        return self._saved


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (int, float, str, bool, type(None), list)) else str(v) for k, v in d.items()}


class _Stop(Exception):
    """Raised by the last watched FFN's hook: nothing after it is needed."""


class _Watcher:
    """The hooks of one `collect` pass: before each watched FFN's up projection the input x is kept (when a
    statistic needs it), before its down projection the neuron activations h and x go to its statistics,
    real tokens only; the last watched FFN ends the forward pass."""

    def __init__(self, watched: list[FFN], per_ffn: list[dict[str, Statistic]]):
        self.watched, self.per_ffn = watched, per_ffn
        self.mask: torch.Tensor | None = None  # (batch·tokens,) real tokens of the current batch; None: all
        self.labels: torch.Tensor | None = None
        self.seen = 0
        self.x: dict[int, torch.Tensor] = {}

    def real_tokens(self, t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1, t.shape[-1])
        return flat if self.mask is None else flat[self.mask]

    def input_hook(self, ffn: FFN) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self.x[ffn.index] = self.real_tokens(args[0].detach()).float()

        return hook

    def down_hook(self, ffn: FFN, stats: dict[str, Statistic]) -> Callable:
        last = ffn.index == self.watched[-1].index

        def hook(module: nn.Module, args: tuple) -> None:
            h = self.real_tokens(args[0].detach()).float()
            info = TokenInfo(self.labels, self.seen)
            x = self.x.pop(ffn.index, None)
            for s in stats.values():
                s.update(x, h, info)
            if last:
                raise _Stop

        return hook

    @contextmanager
    def hooked(self, model: nn.Module, needs_input: bool) -> Iterator[None]:
        handles = []
        try:
            for ffn, stats in zip(self.watched, self.per_ffn):
                up, _, down = ffn.modules(model)
                if needs_input:
                    handles.append(up.register_forward_pre_hook(self.input_hook(ffn)))
                handles.append(down.register_forward_pre_hook(self.down_hook(ffn, stats)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def stream(self, model: nn.Module, batches: Iterable[TokenBatch], bar: Any) -> int:
        """Run every batch through `model`; the real tokens seen."""
        tokens = 0
        for batch in batches:
            mask = batch.attention_mask.reshape(-1).bool()
            self.mask = None if bool(mask.all()) else mask
            self.labels = batch.token_labels()
            self.seen = tokens
            with suppress(_Stop):  # the last watched FFN ends the forward pass
                model(**batch.inputs)
            tokens += int(mask.sum())
            bar.update(int(mask.sum()))
        return tokens


def collect(
    model: nn.Module,
    data: Any,
    statistics: Sequence[Statistic],
    *,
    tokenizer: Any = None,
    ffns: Sequence[FFN] | None = None,
    ffn_modules: str | dict[str, str] | None = None,
    layers: Iterable[int] | None = None,
    max_tokens: int | None = 100_000,
    max_length: int = 128,
    batch_size: int = 16,
    pack: bool | None = None,
    progress: bool = True,
    threads: int | None = None,
    batches: Iterable[TokenBatch] | None = None,
) -> Activations:
    """Stream calibration text through `model` and accumulate `statistics` for every (watched) FFN.

    data: a CalibrationData, TextClassificationData, spec string (see `load_calibration`) or list of
    texts; or pass ready `batches` (then `data` may be None). Decoders get packed sequences (pack=None
    decides from the model). `layers` restricts the FFNs watched (by index); `max_tokens` bounds the
    real tokens streamed. Raises DataError when the data yields fewer tokens than a statistic needs.
    The model is left as it was (`frozen`: it runs in eval mode).
    """
    if not statistics:
        raise ConfigError("collect needs at least one statistic")
    names = [s.name for s in statistics]
    if len(set(names)) != len(names):
        raise ConfigError(f"two statistics are named alike ({names}); give one a name=...")
    all_ffns = list(ffns) if ffns is not None else find_ffns(model, ffn_modules)
    watched = all_ffns if layers is None else [f for f in all_ffns if f.index in set(layers)]
    if not watched:
        raise ConfigError(f"no FFN selected: layers {sorted(set(layers or []))} not in 0..{len(all_ffns) - 1}")
    source = "batches"
    if batches is None:
        if tokenizer is None:
            raise ConfigError("collect needs a tokenizer to turn texts into tokens (or ready batches)")
        calib = CalibrationData.of(data)
        pack = is_causal_lm(model) if pack is None else pack
        batches = token_batches(tokenizer, calib, max_length=max_length, batch_size=batch_size, pack=pack,
                                max_tokens=max_tokens)
        source = calib.name
    per_ffn = [{s.name: s for s in (copy.deepcopy(p) for p in statistics)} for _ in watched]
    for ffn, stats in zip(watched, per_ffn):
        w = ffn_weights(model, ffn)
        for s in stats.values():
            s.start(ffn, w)
    watcher = _Watcher(watched, per_ffn)
    with (
        frozen(model),
        watcher.hooked(model, any(s.needs_input for s in statistics)),
        progress_bar(max_tokens, "collect activations", "tok", enabled=progress) as bar,
        torch_threads(threads),
        torch.inference_mode(),
    ):
        bar.leave = False  # a step of a larger job: gone once done
        tokens = watcher.stream(model, batches, bar)
    needed = max(s.min_tokens for s in statistics)
    if tokens < needed:
        raise DataError(
            f"calibration data {source!r} gave {tokens} tokens; the statistics asked for "
            f"({', '.join(names)}) need at least {needed}: give more text"
        )
    return Activations(watched, per_ffn, tokens, source)


# ------------------------------------------------------------------------------------- interventions


@contextmanager
def edit_neurons(
    model: nn.Module,
    edit: Callable[[FFN, torch.Tensor], torch.Tensor],
    *,
    ffns: Sequence[FFN] | None = None,
    ffn_modules: str | dict[str, str] | None = None,
) -> Iterator[list[FFN]]:
    """Within the block, every FFN's neuron activations h (…, d_ff) are replaced by `edit(ffn, h)` before
    the down projection. The most general intervention (per-token oracles, noise, patching)."""
    ffns = list(ffns) if ffns is not None else find_ffns(model, ffn_modules)
    handles = []

    def hook_for(ffn: FFN) -> Callable:
        def hook(module: nn.Module, args: tuple) -> tuple:
            return (edit(ffn, args[0]), *args[1:])

        return hook

    try:
        for ffn in ffns:
            handles.append(ffn.modules(model)[2].register_forward_pre_hook(hook_for(ffn)))
        yield ffns
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def neuron_masks(
    model: nn.Module,
    masks: dict[int, torch.Tensor],
    *,
    fill: dict[int, torch.Tensor] | None = None,
    ffns: Sequence[FFN] | None = None,
    ffn_modules: str | dict[str, str] | None = None,
) -> Iterator[list[FFN]]:
    """Run the model with FFN neurons kept (mask True / 1) or ablated (False / 0), per FFN index.

    masks[i]: (d_ff,) bool or float (a float mask scales neurons). Ablated neurons output 0, or the value
    in fill[i] (d_ff,) when given (mean ablation: pass Moments' 'mean'). FFNs absent from `masks` are
    untouched. Example: evaluate a subnetwork

        with neuron_masks(model, {0: keep0, 1: keep1}):
            loss = model(**batch).loss
    """
    ffns = list(ffns) if ffns is not None else find_ffns(model, ffn_modules)
    known = {f.index: f for f in ffns}
    unknown = sorted(set(masks) - set(known))
    if unknown:
        raise ConfigError(f"neuron_masks: no FFN {unknown[0]}; the model has FFNs 0..{len(ffns) - 1}")
    prepared: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for index, mask in masks.items():
        d_ff = known[index].modules(model)[2].in_features
        mask = torch.as_tensor(mask)
        if mask.shape != (d_ff,):
            raise ConfigError(f"neuron_masks: the mask of FFN {index} has shape {list(mask.shape)}, expected [{d_ff}]")
        keep = mask.float()
        values = None
        if fill is not None and index in fill:
            values = (1 - keep) * torch.as_tensor(fill[index]).float()
        prepared[index] = (keep, values)

    def edit(ffn: FFN, h: torch.Tensor) -> torch.Tensor:
        if ffn.index not in prepared:
            return h
        keep, values = prepared[ffn.index]
        out = h * keep.to(h.dtype)
        return out if values is None else out + values.to(h.dtype)

    with edit_neurons(model, edit, ffns=[f for f in ffns if f.index in prepared]) as watched:
        yield watched
