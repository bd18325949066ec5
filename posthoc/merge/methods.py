"""The merge methods: pure functions of float tensors, registered with their parameters.

Conventions shared by every method:
- `tensors` are the non-base inputs in config order (for methods whose base is "ignored", a configured
  base is simply one more entry of `tensors`), `base` is the base tensor or None.
- Inputs arrive in their stored floating dtype (or the config's `dtype`); all arithmetic is float32
  (float64 when an input is float64) and the result is returned in that dtype; the engine casts it.
- Parameter names, defaults and semantics follow mergekit 0.1.5, so its YAML files mean the same here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch

from posthoc import sparsify
from posthoc.errors import ConfigError, OutputError
from posthoc.merge.registry import (
    DENSITY,
    PER_MODEL,
    MergeMethod,
    Param,
    ParamSpec,
    PerModel,
    Required,
    merge_method,
    register,
)

Fraction = Annotated[float, Param(low=0.0, high=1.0)]
Positive = Annotated[float, Param(low=0.0, low_open=True)]


@merge_method("linear", base="ignored", reads_row_chunks=True, linear=True, paper="https://arxiv.org/abs/2203.05482")
def linear(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: PerModel = Required,
    normalize: bool = True,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Weighted average (model soup): Σ wᵢθᵢ, divided by Σ wᵢ when normalize."""
    compute = _compute_dtype(*tensors)
    shape = tensors[0].shape
    flats = [t.reshape(-1) for t in tensors]
    out = torch.empty(tensors[0].numel(), dtype=out_dtype or compute)
    for s in sparsify.sub_slices(slice(0, tensors[0].numel())):
        total = torch.mul(flats[0][s].to(compute), weight[0])
        for flat, w in zip(flats[1:], weight[1:]):
            total.add_(flat[s].to(compute), alpha=w)  # cast first: mixed-dtype add_ is slower
        if normalize:
            total /= sum(weight)
        out[s] = total
    return out.reshape(shape)


# ------------------------------------------------------------------------------------------- task-arithmetic family
# Task arithmetic, TIES, DARE, breadcrumbs and DELLA are configurations of one kernel,
# θ₀ + λ · combine(wᵢ · sparsify(θᵢ − θ₀)): each sparsification is declared once (`Sparsification`), each member
# of the family is one `FamilyMember` in TASK_ARITHMETIC_FAMILY.


@dataclass(frozen=True)
class TaskInput:
    """One input's task vector θᵢ − θ₀ (flat), as a selection reads it."""

    vector: sparsify.TaskVector  # formed slice by slice from the stored tensors (the top-k fits)
    passes: sparsify.Chunks  # fresh passes over its row chunks (random draws)
    n: int  # entries
    row: int  # entries per row
    generator: np.random.Generator | None  # its own draws (randomized sparsifications only)


@dataclass(frozen=True)
class Sparsification:
    """How each task vector is thinned before the combination, declared once for the members that use it.

    `select(task, density, rescale, **extra)` fits the `sparsify.Selection` of one input; `extra` holds that
    input's value of each parameter in `params` (those beyond `density`, which every sparsification has)."""

    name: str
    select: Callable[..., sparsify.Selection]
    params: tuple[ParamSpec, ...] = ()
    randomized: bool = False  # draws random numbers: every input gets a generator of its own from the seed
    validate: Callable[[dict[str, Any], str], None] | None = None  # checks that involve several parameters


def _magnitude(task: TaskInput, density: float, rescale: bool) -> sparsify.Selection:
    return sparsify.magnitude_selection(task.vector, task.n, density, rescale)


def _breadcrumbs(task: TaskInput, density: float, rescale: bool, gamma: float) -> sparsify.Selection:
    return sparsify.breadcrumbs_selection(task.vector, task.n, density, gamma, rescale)


def _random(task: TaskInput, density: float, rescale: bool) -> sparsify.Selection:
    return sparsify.random_selection(task.passes, task.n, density, rescale, task.generator)


def _della(task: TaskInput, density: float, rescale: bool, epsilon: float) -> sparsify.Selection:
    return sparsify.della_selection(task.passes, task.n, task.row, density, epsilon, rescale, task.generator)


def _check_della(params: dict[str, Any], where: str) -> None:
    for density, epsilon in zip(params["density"], params["epsilon"]):
        if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
            raise ConfigError(
                f"della {where}: density ± epsilon must lie inside (0, 1), got density {density} and epsilon {epsilon}"
            )


MAGNITUDE = Sparsification("magnitude", _magnitude)  # TIES: the top-density magnitudes
RANDOM = Sparsification("random", _random, randomized=True)  # DARE: each entry kept with probability density
BREADCRUMBS = Sparsification(
    "breadcrumbs", _breadcrumbs,
    params=(ParamSpec("gamma", "gamma", float, 0.01, Param(per_model=True, low=0.0, high=1.0, high_open=True)),),
)
DELLA = Sparsification(
    "della", _della, randomized=True, validate=_check_della,
    params=(ParamSpec("epsilon", "epsilon", float, 0.15, Param(per_model=True, low=0.0, high=0.5, high_open=True)),),
)


def task_arithmetic_family(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    sparsification: Sparsification | None,
    consensus: bool,
    weight: list[float],
    density: list[float] | None = None,
    normalize: bool,
    rescale: bool,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
    out_dtype: torch.dtype | None = None,
    **extra: list[float],
) -> torch.Tensor:
    """θ₀ + λ · combine(wᵢ · sparsify(θᵢ − θ₀)): task arithmetic, TIES, DARE, breadcrumbs and DELLA.

    sparsification: None (every entry kept) or how each task vector is thinned (MAGNITUDE for TIES, RANDOM
    for DARE, BREADCRUMBS, DELLA); `extra` holds its own parameters (gamma, epsilon).
    consensus: TIES sign election, then the mean over the inputs that agree with the elected sign.
    normalize: divide by the sum of weights (of the agreeing inputs, with consensus).
    int8_mask only changed the dtype of mergekit's mask and has no effect on the result.
    Runs chunk by chunk of whole rows (see `sparsify`), fitting whole-tensor selections first; it only
    slices flat views of its inputs, so very large inputs may be lazy row readers.
    """
    compute = _compute_dtype(base, *tensors)
    flat_base, flats = base.reshape(-1), [t.reshape(-1) for t in tensors]
    if sparsification is None and not consensus:
        divisor = _weight_total(weight) if normalize else 1.0
        coefficients = [lambda_ * w / divisor for w in weight]
        return _sum_of_deltas(flat_base, flats, coefficients, out_dtype or compute).reshape(base.shape)
    vectors = _TaskVectors(flats, flat_base, base.shape, compute)
    selections = _selections(vectors, sparsification, density, rescale, extra, generator)
    # Each input contributes wᵢ·scaleᵢ·δᵢ (scale: the rescale of its selection).
    contributions = [w * sel.scale for w, sel in zip(weight, selections)]
    combine = _Combination(contributions, weight, consensus, normalize, lambda_)
    return _combined(vectors, selections, combine, out_dtype or compute).reshape(base.shape)


class _TaskVectors:
    """The inputs' task vectors by chunks of whole rows, formed when asked (flat; lazy readers allowed).

    A tensor of one chunk keeps each input's task vector between the passes of a random selection and the
    combination (`forget` drops them)."""

    def __init__(self, flats: list[torch.Tensor], base: torch.Tensor, shape: torch.Size, compute: torch.dtype):
        self.flats, self.base, self.compute = flats, base, compute
        self.n = base.numel()
        self.chunks = sparsify.row_chunks(shape)
        self.row = self.n // shape[0] if len(shape) > 1 and shape[0] else max(self.n, 1)
        self._kept: dict[int, torch.Tensor] = {}

    def delta(self, i: int, s: slice) -> torch.Tensor:
        if i not in self._kept:
            d = sparsify.task_vector(self.flats[i][s], self.base[s].to(self.compute))
            if len(self.chunks) > 1:
                return d
            self._kept[i] = d
        return self._kept[i]

    def task(self, i: int, generator: np.random.Generator | None) -> TaskInput:
        vector = sparsify.TaskVector(self.flats[i], self.base, self.chunks, self.compute)
        return TaskInput(vector, lambda: ((s, self.delta(i, s)) for s in self.chunks), self.n, self.row, generator)

    def forget(self) -> None:
        self._kept.clear()


def _selections(
    vectors: _TaskVectors,
    sparsification: Sparsification | None,
    density: list[float] | None,
    rescale: bool,
    extra: dict[str, list[float]],
    generator: torch.Generator | None,
) -> list[sparsify.Selection]:
    """Each input's selection, fitted on its whole task vector."""
    count = len(vectors.flats)
    if sparsification is None:
        return [sparsify.KEEP_ALL] * count
    # One generator per input, so each input's draws depend only on the seed and its position.
    generators = [sparsify.derived_generator(generator) if sparsification.randomized else None for _ in range(count)]
    selections = []
    for i in range(count):
        own = {p.argument: extra[p.argument][i] if p.scope.per_model else extra[p.argument] for p in sparsification.params}
        task = vectors.task(i, generators[i])
        selections.append(sparsification.select(task, density[i] if density is not None else 1.0, rescale, **own))
    return selections


def _combined(
    vectors: _TaskVectors, selections: list[sparsify.Selection], combine: _Combination, out_dtype: torch.dtype
) -> torch.Tensor:
    """θ₀ + combine(keptᵢ), flat: chunk by chunk of rows, on cache-sized slices of each chunk."""
    out = torch.empty(vectors.n, dtype=out_dtype)
    sliceable = all(selection.sliceable for selection in selections)
    for s in vectors.chunks:
        bases, inputs = vectors.base[s], [flat[s] for flat in vectors.flats]  # one read of a lazy chunk
        if not sliceable:  # random draws follow the chunks of the fitting pass: select whole chunks
            kept = [selection.keep(s, vectors.delta(i, s)) for i, selection in enumerate(selections)]
        for u in sparsify.sub_slices(slice(0, s.stop - s.start)):
            b = bases[u].to(vectors.compute)
            at = slice(s.start + u.start, s.start + u.stop)
            if sliceable:
                local = [sel.keep(at, sparsify.task_vector(x[u], b)) for x, sel in zip(inputs, selections)]
            else:
                local = [k[u] for k in kept]
            out[at] = combine(local).add_(b)
        vectors.forget()
    return out


def _weight_total(weight: list[float]) -> float:
    """Σ wᵢ as a divisor (1 when it vanishes)."""
    total = sum(weight)
    return total if abs(total) >= 1e-8 else 1.0


def _sum_of_deltas(base: torch.Tensor, flats: list[torch.Tensor], coefficients: list[float], out_dtype: torch.dtype) -> torch.Tensor:
    """θ₀ + Σ aᵢ(θᵢ − θ₀) on cache-sized slices, without the selection machinery (plain task arithmetic).

    Each task vector is formed exactly (θᵢ − θ₀ of nearby floats is exact in float32), so the result is
    rounded once, like the general path."""
    compute = _compute_dtype(base, *flats)
    out = torch.empty(base.numel(), dtype=out_dtype)
    for u in sparsify.sub_slices(slice(0, base.numel())):
        b = base[u].to(compute)
        total = sparsify.task_vector(flats[0][u], b).mul_(coefficients[0])
        for x, a in zip(flats[1:], coefficients[1:]):
            total.add_(sparsify.task_vector(x[u], b), alpha=a)
        out[u] = total.add_(b)
    return out


class _Combination:
    """λ · combine(cᵢ · keptᵢ) on one slice: a weighted sum, or TIES' sign election and disjoint mean.

    Works in place on the kept task vectors it is given (they are temporaries of one slice)."""

    def __init__(self, contributions: list[float], weight: list[float], consensus: bool, normalize: bool, lambda_: float):
        self.contributions, self.weight = contributions, weight
        self.consensus, self.normalize, self.lambda_ = consensus, normalize, lambda_
        self.total_weight = _weight_total(weight)

    def __call__(self, kept: list[torch.Tensor]) -> torch.Tensor:
        mixed = kept[0] * self.contributions[0]
        for d, c in zip(kept[1:], self.contributions[1:]):
            mixed.add_(d, alpha=c)
        divisor: torch.Tensor | float = self.total_weight
        if self.consensus:
            # Σ over agreeing inputs of cᵢδᵢ = e · Σ cᵢ·max(e·δᵢ, 0) for the elected sign e (cᵢ > 0 here).
            elected = sparsify.elected_sign(mixed)
            agreeing: torch.Tensor | None = None  # Σ |cᵢ|·max(e·δᵢ, 0)
            for d, c, w in zip(kept, self.contributions, self.weight):
                if c == 0:
                    continue
                aligned = d.mul_(elected if c > 0 else -elected).clamp_(min=0)
                if agreeing is None:  # the first input starts both sums (no zero-filled buffers)
                    agreeing = aligned * abs(c)
                    divisor = aligned.sign_().mul_(w)  # aligned ≥ 0, so its sign is the agreement 0/1
                else:
                    agreeing.add_(aligned, alpha=abs(c))
                    divisor.add_(aligned.sign_(), alpha=w)
            if agreeing is None:  # every contribution is zero
                return mixed.zero_()
            mixed = agreeing.mul_(elected)
            if all(w > 0 for w in self.weight):  # a zero divisor then means nothing agreed and mixed is 0 there
                divisor.clamp_(min=1e-30)
            else:
                divisor.masked_fill_(divisor == 0, 1.0)
        if self.normalize:
            mixed /= divisor
        if self.lambda_ != 1:
            mixed *= self.lambda_
        return mixed


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float32 arithmetic, or float64 when an input is float64 (inputs may arrive in bf16/fp16)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _upcast(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    compute = _compute_dtype(*tensors)
    return [None if t is None else t.to(compute) for t in tensors]


@dataclass(frozen=True)
class FamilyMember:
    """One method of the task-arithmetic family: a configuration of `task_arithmetic_family`."""

    name: str
    sparsification: Sparsification | None
    consensus: bool  # TIES sign election and disjoint mean
    normalize: bool  # default of the `normalize` parameter
    rescale: bool  # default of the `rescale` parameter (the kept entries scaled to the task vector's L1 norm)
    paper: str
    summary: str

    def method(self) -> MergeMethod:
        sparsification, consensus = self.sparsification, self.consensus

        def merge(tensors: list[torch.Tensor], base: torch.Tensor, **params: Any) -> torch.Tensor:
            return task_arithmetic_family(tensors, base, sparsification=sparsification, consensus=consensus, **params)

        return MergeMethod(
            name=self.name,
            fn=merge,
            params={p.name: p for p in self.params()},
            base="required",
            min_models=1,
            max_models=None,
            randomized=sparsification is not None and sparsification.randomized,
            paper=self.paper,
            summary=self.summary,
            validate=sparsification.validate if sparsification is not None else None,
            takes_out_dtype=True,
            reads_row_chunks=True,
            linear=sparsification is None and not consensus,  # θ₀ + Σ (λwᵢ/divisor)(θᵢ − θ₀)
            on_task_vectors=True,
        )

    def params(self) -> list[ParamSpec]:
        params = [ParamSpec("weight", "weight", float, Required, PER_MODEL)]
        if self.sparsification is not None:
            params += [ParamSpec("density", "density", float, 1.0, DENSITY), *self.sparsification.params]
        return params + [
            ParamSpec("normalize", "normalize", bool, self.normalize, Param()),
            ParamSpec("rescale", "rescale", bool, self.rescale, Param()),
            ParamSpec("lambda", "lambda_", float, 1.0, Param()),
            ParamSpec("int8_mask", "int8_mask", bool, False, Param()),
        ]


TASK_ARITHMETIC_FAMILY = (
    FamilyMember(
        "task_arithmetic", None, consensus=False, normalize=False, rescale=False, paper="https://arxiv.org/abs/2212.04089",
        summary="θ₀ + λ Σ wᵢ(θᵢ − θ₀): task vectors added to the base",
    ),
    FamilyMember(
        "ties", MAGNITUDE, consensus=True, normalize=True, rescale=False, paper="https://arxiv.org/abs/2306.01708",
        summary="TIES: trim each task vector to its top-density magnitudes, elect signs, disjoint mean",
    ),
    FamilyMember(
        "dare_linear", RANDOM, consensus=False, normalize=False, rescale=True, paper="https://arxiv.org/abs/2311.03099",
        summary="DARE: drop task-vector entries at random (keep density), rescale, add",
    ),
    FamilyMember(
        "dare_ties", RANDOM, consensus=True, normalize=False, rescale=True, paper="https://arxiv.org/abs/2311.03099",
        summary="DARE drop + TIES sign election",
    ),
    FamilyMember(
        "breadcrumbs", BREADCRUMBS, consensus=False, normalize=False, rescale=False,
        paper="https://arxiv.org/abs/2312.06795",
        summary="Model breadcrumbs: drop the largest (gamma) and the smallest entries, add",
    ),
    FamilyMember(
        "breadcrumbs_ties", BREADCRUMBS, consensus=True, normalize=False, rescale=False,
        paper="https://arxiv.org/abs/2312.06795", summary="Model breadcrumbs + TIES sign election",
    ),
    FamilyMember(
        "della", DELLA, consensus=True, normalize=True, rescale=True, paper="https://arxiv.org/abs/2406.11617",
        summary="DELLA: magnitude-ranked random drop (density ± epsilon), rescale, TIES election",
    ),
    FamilyMember(
        "della_linear", DELLA, consensus=False, normalize=False, rescale=True, paper="https://arxiv.org/abs/2406.11617",
        summary="DELLA drop, rescale, add",
    ),
)

for _member in TASK_ARITHMETIC_FAMILY:
    register(_member.method())


@merge_method(
    "slerp", base="required", min_models=1, max_models=1, reads_row_chunks=True, paper="https://en.wikipedia.org/wiki/Slerp"
)
def slerp(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    t: Fraction = Required,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Spherical interpolation between the base (t = 0) and the other model (t = 1).

    Two passes over row chunks: the norms and the dot product (accumulated in float64), then the output,
    so a large tensor is never held whole in float32.
    """
    compute = _compute_dtype(base, tensors[0])
    shape = base.shape
    flat_a, flat_b = base.reshape(-1), tensors[0].reshape(-1)
    chunks = sparsify.row_chunks(shape)
    if not chunks:
        return torch.empty(shape, dtype=out_dtype or compute)
    cached = (flat_a[chunks[0]].to(compute), flat_b[chunks[0]].to(compute)) if len(chunks) == 1 else None

    def pair(s: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return cached if cached is not None else (flat_a[s].to(compute), flat_b[s].to(compute))

    aa = bb = ab = 0.0
    for s in chunks:
        a, b = pair(s)
        aa += float(torch.dot(a, a))
        bb += float(torch.dot(b, b))
        ab += float(torch.dot(a, b))
    na, nb = math.sqrt(aa), math.sqrt(bb)
    na = na if na > 1e-8 else 1.0
    nb = nb if nb > 1e-8 else 1.0
    dot = min(1.0, max(-1.0, ab / (na * nb)))
    if abs(dot) > 0.9995:  # nearly colinear: the spherical formula is ill-conditioned; interpolate linearly
        ca, cb = 1 - t, t
    else:
        theta = math.acos(dot)
        ca, cb = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    out = torch.empty(base.numel(), dtype=out_dtype or compute)
    for s in chunks:
        a, b = pair(s)
        out[s] = torch.mul(a, ca).add_(b, alpha=cb)
    return out.reshape(shape)


@merge_method("multislerp", base="optional", paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea")
def multislerp(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: PerModel = Required,
    normalize_weights: bool = True,
    eps: Positive = 1e-8,
) -> torch.Tensor:
    """Weighted spherical barycenter of several models (of their task vectors when a base is given)."""
    base, *tensors = _upcast(base, *tensors)
    if len(tensors) == 1:
        return tensors[0].clone()
    shape = tensors[0].shape
    vectors = [(x - base if base is not None else x).reshape(-1) for x in tensors]
    w = torch.tensor(weight, dtype=vectors[0].dtype)
    if normalize_weights:
        w = w / w.sum()
    norms = [torch.linalg.vector_norm(v) for v in vectors]
    if all(n <= eps for n in norms):  # no model changed this tensor (frozen while fine-tuning): nothing to move
        return tensors[0].clone()
    units = [v / (n + eps) for v, n in zip(vectors, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(vectors) != 2:
            raise OutputError(
                "multislerp: the task vectors cancel out (their weighted mean direction is zero); change the models' "
                "weights, or merge with another method"
            )
        out = w[0] * vectors[0] + w[1] * vectors[1]
    else:
        mean = mean / mean_norm
        tangent = sum(wi * (u - torch.dot(u, mean) * mean) for wi, u in zip(w, units))
        tau = torch.linalg.vector_norm(tangent) + eps
        out = (mean * torch.cos(tau) + tangent * torch.sin(tau) / tau) * sum(wi * n for wi, n in zip(w, norms))
    out = out.reshape(shape)
    return out + base if base is not None else out


@merge_method("model_stock", base="required", min_models=2, paper="https://arxiv.org/abs/2403.19522")
def model_stock(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    filter_wise: bool = False,
) -> torch.Tensor:
    """Model Stock: average of the fine-tunes pulled towards the base by their task vectors' angle."""
    base, *tensors = _upcast(base, *tensors)
    n = len(tensors)
    shape = base.shape
    if filter_wise:
        rows = (lambda x: x.reshape(1, -1)) if base.dim() <= 1 else (lambda x: x.reshape(-1, x.shape[-1]))
    else:
        rows = lambda x: x.reshape(1, -1)  # noqa: E731
    origin = rows(base)
    offsets = [rows(x) - origin for x in tensors]
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            norm = torch.clamp(
                torch.linalg.vector_norm(offsets[i], dim=-1) * torch.linalg.vector_norm(offsets[j], dim=-1), min=1e-6
            )
            cosines.append(torch.clamp((offsets[i] * offsets[j]).sum(-1) / norm, -1, 1))
    cos = torch.stack(cosines).mean(0)
    denominator = 1 + (n - 1) * cos
    ratio = torch.where(denominator.abs() < 1e-6, torch.zeros_like(cos), n * cos / denominator).unsqueeze(-1)
    average = sum(rows(x) for x in tensors) / n
    return (ratio * average + (1 - ratio) * origin).reshape(shape)


@merge_method(
    "passthrough", base="ignored", max_models=1, reads_row_chunks=True, linear=True,
    paper="https://github.com/arcee-ai/mergekit",
)
def passthrough(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    scale: PerModel = 1.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Copy the single input, optionally scaled."""
    flat = tensors[0].reshape(-1)
    compute = _compute_dtype(tensors[0])
    out = torch.empty(tensors[0].numel(), dtype=out_dtype or compute)
    for s in sparsify.row_chunks(tensors[0].shape):
        out[s] = flat[s].to(compute) * scale[0]
    return out.reshape(tensors[0].shape)
