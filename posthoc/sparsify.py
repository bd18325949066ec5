"""Kernels of the task-arithmetic family: select entries of a task vector, rescale, vote on signs.

Task vectors are processed in chunks of whole rows, so merging an embedding matrix never holds more than
the inputs, the output and a few chunk-sized temporaries. Selections that depend on the whole tensor
(the top-k magnitudes of TIES and breadcrumbs, the L1 norms of a rescale) are fitted first:

- `TopK` finds the k largest magnitudes exactly without sorting. Magnitudes are bucketed by their
  bfloat16 bit patterns (order-preserving for non-negative floats); a sample proposes a few bucket edges
  around the k-th largest, one pass counts exactly the entries reaching each edge, a second gathers the
  few between the two edges that hold the k-th, and `kthvalue` on its bucket gives the exact threshold.
  Among entries equal to the threshold the lower flat indices are kept, so exactly k entries survive
  whatever the chunking (ties are common: bf16 task vectors take few values).
- Random selections (DARE, DELLA) draw from a generator whose state is saved after fitting and replayed,
  so both passes see the same mask and a seed gives the same merge.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

CHUNK_ELEMENTS = 1 << 20
WHOLE_ELEMENTS = 1 << 22  # tensors up to this size are one chunk (random selections keep their task vectors)
KEEP_KEYS_ELEMENTS = 1 << 26  # the top-k fit computes the keys of a vector up to this size once (≤ 128 MB of int16)
SLICE_ELEMENTS = 1 << 16  # the combining arithmetic runs on flat slices this size, so its temporaries stay in cache
GATHER_ELEMENTS = 1 << 18  # key comparisons of the top-k fit run on flat slices this size
SAMPLE_STRIDE, SAMPLE_BLOCK = 61, 32  # the top-k fit samples one block of 32 keys in 61 (see `_blocks`)
SAMPLE_EDGES = 6  # key edges the top-k fit counts around the sampled k-th (each one numpy compare per entry)
_BUCKETS = 1 << 15  # non-negative bfloat16 bit patterns (NaN included) have the top bit clear

Chunks = Callable[[], Iterator[tuple[slice, torch.Tensor]]]  # a fresh pass: (flat slice, delta chunk)


def row_chunks(shape: torch.Size | tuple[int, ...], chunk_elements: int | None = None) -> list[slice]:
    """Flat slices of whole rows (rows = first dimension) holding about `chunk_elements` entries each."""
    n = math.prod(shape)
    if n == 0:
        return []
    if chunk_elements is None:
        chunk_elements = n if n <= WHOLE_ELEMENTS else CHUNK_ELEMENTS
    row = n // shape[0] if len(shape) > 1 else n
    step = max(1, chunk_elements // row) * row
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def sub_slices(s: slice, size: int | None = None) -> list[slice]:
    """`s` cut into consecutive flat slices of at most `size` entries (default SLICE_ELEMENTS).

    Elementwise arithmetic on a few hundred kB at a time runs from the CPU cache: measured on one merged
    tensor of 2.9 M entries, 2× faster than the same operations on the whole tensor."""
    size = size or SLICE_ELEMENTS
    return [slice(i, min(i + size, s.stop)) for i in range(s.start, s.stop, size)]


def _buckets(values: torch.Tensor) -> torch.Tensor:
    """Histogram bucket of each value's magnitude: the bit pattern of its bfloat16 rounding without the sign
    bit, read as an int16.

    Rounding is monotone and symmetric, and the patterns of non-negative floats are ordered like their
    values, so buckets are ordered like magnitudes (ties within a bucket are settled exactly in the second
    pass). A cast and a mask, no abs: measured 2× faster than shifting float32 patterns of |δ|, and bincount
    is faster on int16. (The vectorised cast turns NaN into 0xFFFF; the mask ranks it above Inf.)"""
    return values.to(torch.bfloat16).view(torch.int16).bitwise_and_(0x7FFF)


@functools.lru_cache(maxsize=64)
def _just_below(value: float, dtype: torch.dtype) -> float:
    """The largest number of `dtype` below `value`: hardshrink(x, it) keeps |x| ≥ value."""
    return float(torch.nextafter(torch.tensor(value, dtype=dtype), torch.tensor(-math.inf, dtype=dtype)))


class TopK:
    """The k entries of largest magnitude of a tensor that arrives in chunks: those above `threshold`, and
    those equal to it at flat positions below `cut`."""

    def __init__(self, k: int, n: int):
        self.k, self.n = k, n
        self.threshold = math.inf
        self.cut = 0
        self.kept_l1 = 0.0

    @property
    def trivial(self) -> bool:
        return self.k <= 0 or self.k >= self.n

    def keep(self, s: slice, delta: torch.Tensor) -> torch.Tensor:
        """The chunk `s` of the task vector with every entry outside the selection set to zero.

        hardshrink(x, λ) keeps |x| > λ in one fused operation; before `cut` the ties are kept too, which is
        hardshrink with λ just below the threshold.
        """
        if self.k <= 0:
            return torch.zeros_like(delta)
        if self.k >= self.n:
            return delta
        end = min(max(self.cut - s.start, 0), delta.numel())
        if end == 0:
            return torch.nn.functional.hardshrink(delta, self.threshold)
        below = _just_below(self.threshold, delta.dtype) if self.threshold > 0 else -1.0
        if end == delta.numel():
            return torch.nn.functional.hardshrink(delta, below)
        return torch.cat(
            [
                torch.nn.functional.hardshrink(delta[:end], below),
                torch.nn.functional.hardshrink(delta[end:], self.threshold),
            ]
        )


def task_vector(x: torch.Tensor, base: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x − base in base's (compute) dtype, into `out` or a new tensor (x is never modified)."""
    # Convert first: torch's mixed-dtype arithmetic (bf16 - f32) is several times slower than a cast + op.
    return torch.sub(x if x.dtype == base.dtype else x.to(base.dtype), base, out=out)


class Deltas:
    """A task vector that arrives as float chunks (flat slice, chunk), for `fit_top_k`.

    `cheap_pieces`: the pieces are views of tensors in memory, so a fit may keep them between passes
    (False: each pass computes or reads them again, and a fit asks for them as few times as it can)."""

    cheap_pieces = False

    def __init__(self, chunks: Chunks):
        self._chunks = chunks

    def pieces(self) -> Iterator[tuple[slice, object]]:
        """(flat slice, piece) per chunk; `delta` and `keys` cut a piece further with local indices."""
        return ((s, d.reshape(-1)) for s, d in self._chunks())

    def delta(self, piece, where: slice | torch.Tensor) -> torch.Tensor:
        return piece[where]

    def keys(self, piece, where: slice) -> torch.Tensor:
        return _buckets(self.delta(piece, where))

    def sample_keys(self, piece) -> torch.Tensor:
        return _buckets(_blocks(piece)).reshape(-1)


def _blocks(flat: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """The first SAMPLE_BLOCK entries of every SAMPLE_STRIDE blocks (a 2-D view): a sample that touches
    1/SAMPLE_STRIDE of the memory, at offsets that cycle through the columns of any row length."""
    span = SAMPLE_STRIDE * SAMPLE_BLOCK
    q = len(flat) // span
    return flat[: q * span].reshape(q, span)[:, :SAMPLE_BLOCK]


class TaskVector(Deltas):
    """θ − θ₀ of one input, formed slice by slice from the stored tensors (flat; lazy readers allowed).

    Never held whole in float32: a fresh whole-tensor buffer costs more in page faults than the arithmetic
    (measured 6× the cost of forming the same deltas on cache-sized slices). When both tensors are
    bfloat16 the bucket keys come from one bfloat16 subtraction, which rounds the exact float32 difference
    to bfloat16 just like `_buckets` does, so the keys are the same without the float32 detour."""

    def __init__(self, x, base, chunks: list[slice], compute: torch.dtype):
        self.x, self.base, self.chunks, self.compute = x, base, chunks, compute
        self._bf16 = x.dtype == base.dtype == torch.bfloat16
        self.cheap_pieces = isinstance(x, torch.Tensor) and isinstance(base, torch.Tensor)  # not lazy readers

    def pieces(self) -> Iterator[tuple[slice, object]]:
        return ((s, (self.x[s], self.base[s])) for s in self.chunks)

    def delta(self, piece, where: slice | torch.Tensor) -> torch.Tensor:
        x, b = piece
        if isinstance(where, torch.Tensor):  # index_select: 2× faster than advanced indexing here
            x, b = x.index_select(0, where), b.index_select(0, where)
        else:
            x, b = x[where], b[where]
        return task_vector(x, b.to(self.compute))

    def keys(self, piece, where: slice) -> torch.Tensor:
        x, b = piece
        return self._keys(x[where], b[where])

    def sample_keys(self, piece) -> torch.Tensor:
        x, b = piece
        return self._keys(_blocks(x), _blocks(b)).reshape(-1)

    def _keys(self, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self._bf16:
            return torch.sub(x, b).view(torch.int16).bitwise_and_(0x7FFF)
        return _buckets(task_vector(x, b.to(self.compute)))


@dataclass
class _Bracket:
    """The entries of one task vector whose keys lie in [lo, hi] (gathered in position order) and the
    number of keys above hi."""

    lo: int
    hi: int
    above: int = 0
    positions: list[torch.Tensor] = field(default_factory=list)
    keys: list[np.ndarray] = field(default_factory=list)
    magnitudes: list[torch.Tensor] = field(default_factory=list)


def fit_top_k(vector: Deltas, selections: list[TopK], with_l1: bool = False) -> float:
    """Fit the selections (threshold and cut of each) on one task vector; with `with_l1` the L1 norm each
    keeps is computed too, and Σ|delta| over the whole vector is returned (else 0).

    No histogram of every entry (bincount serialises on the repeated keys of sparse task vectors, and
    gathering a wide range of keys is slow where many entries hit): a block sample proposes a few key
    edges around the k-th largest; one pass counts exactly how many keys reach each edge (numpy compares),
    which pins the k-th between two edges; another gathers only that narrow range. The keys are computed
    once for all of this (see `_KeySlices`). When the sample misleads (the k-th lies outside its edges),
    an exact histogram finds the bucket instead: the result never depends on the sample."""
    active = [s for s in selections if not s.trivial]
    if active:
        keys = _KeySlices(vector, active[0].n, keep=active[0].n <= KEEP_KEYS_ELEMENTS)
        brackets = _brackets(keys, active)
        _gather(keys, brackets)
        for selection, bracket in zip(active, brackets):
            _settle(selection, bracket)
    if not with_l1:
        return 0.0
    total = 0.0
    kept_l1 = {id(s): 0.0 for s in active}
    for s, piece in vector.pieces():
        delta = vector.delta(piece, slice(None))
        total += float(torch.linalg.vector_norm(delta, 1, dtype=torch.float64))
        for selection in active:
            kept_l1[id(selection)] += float(selection.keep(s, delta).abs().sum(dtype=torch.float64))
    for selection in active:
        selection.kept_l1 = kept_l1[id(selection)]
    return total


class _KeySlices:
    """The keys of a task vector by slices of GATHER_ELEMENTS, for the passes of one fit.

    With `keep` they are computed once, on a first pass that also takes the block sample, and later passes
    reuse them: the sample, the count and the gather then cost one computation of the task vector (for a
    lazily read embedding matrix, two reads instead of six). Without `keep` (vectors too large to hold their
    keys) every pass computes them again."""

    def __init__(self, vector: Deltas, n: int, keep: bool):
        self.vector, self.n, self.keep = vector, n, keep
        self._kept: list[tuple[int, object, slice, np.ndarray]] | None = None  # piece None: not cheap to hold
        self._sample: np.ndarray | None = None

    def _slices(self) -> Iterator[tuple[int, object, slice]]:
        """(flat offset, piece, slice in the piece) per slice, in one pass over the pieces."""
        for s, piece in self.vector.pieces():
            for u in sub_slices(slice(0, s.stop - s.start), GATHER_ELEMENTS):
                yield s.start + u.start, piece, u

    def _computed(self) -> Iterator[tuple[int, object, slice, np.ndarray]]:
        for offset, piece, u in self._slices():
            yield offset, piece, u, self.vector.keys(piece, u).numpy()

    def _compute_and_keep(self) -> None:
        # One block for all the keys: hundreds of slice-sized arrays held at once fragment the heap (measured:
        # peak RSS 0.48 -> 0.90 GB on a float32 TIES merge whose embedding matrices kept their keys that way).
        every = np.empty(self.n, dtype=np.int16)
        self._kept, sample = [], []
        for offset, piece, u, values in self._computed():
            kept = every[offset : offset + values.size]
            kept[:] = values
            self._kept.append((offset, piece if self.vector.cheap_pieces else None, u, kept))
            sample.append(_blocks(kept).reshape(-1))
        self._sample = np.concatenate(sample) if sample else np.zeros(0, dtype=np.int16)

    def sample(self) -> np.ndarray:
        """The keys of a block sample (see `_blocks`) of about 1/SAMPLE_STRIDE of the entries."""
        if not self.keep:
            return torch.cat([self.vector.sample_keys(piece) for _, piece in self.vector.pieces()]).numpy()
        if self._kept is None:
            self._compute_and_keep()
        return self._sample

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        """(flat offset, keys) per slice."""
        if self._kept is None and self.keep:
            self._compute_and_keep()
        if self._kept is None:
            return ((offset, values) for offset, _, _, values in self._computed())
        return ((offset, values) for offset, _, _, values in self._kept)

    def with_pieces(self) -> Iterator[tuple[int, object, slice, np.ndarray]]:
        """(flat offset, piece, slice in the piece, keys) per slice; pieces not held are produced again."""
        if self._kept is None:
            yield from self._computed()
        elif self.vector.cheap_pieces:
            yield from self._kept
        else:
            for (offset, piece, u), (_, _, _, values) in zip(self._slices(), self._kept):
                yield offset, piece, u, values


def _brackets(keys: _KeySlices, selections: list[TopK]) -> list[_Bracket]:
    """Per selection, a range of keys holding its k-th largest and the exact count of keys above it."""
    n = selections[0].n
    if n <= SAMPLE_STRIDE * SAMPLE_BLOCK * 16:  # too few to sample: gather everything
        return [_Bracket(0, _BUCKETS - 1) for _ in selections]
    edges = _sample_edges(keys.sample(), n, selections)
    if edges is None:  # pieces too small to sample (tiny chunks): the exact histogram
        return _exact_brackets(keys, selections)
    reached = [np.zeros(len(e), dtype=np.int64) for e in edges]  # keys ≥ each edge
    for _, values in keys:
        for count, selection_edges in zip(reached, edges):
            for j, edge in enumerate(selection_edges):
                count[j] += np.count_nonzero(values >= edge)
    brackets: list[_Bracket | None] = []
    for selection, selection_edges, count in zip(selections, edges, reached):
        j = int(np.searchsorted(count, selection.k))  # first edge that k keys reach (counts ascend)
        if 0 < j < len(count):
            brackets.append(_Bracket(selection_edges[j], selection_edges[j - 1] - 1, int(count[j - 1])))
        else:
            brackets.append(None)
    missed = [i for i, b in enumerate(brackets) if b is None]
    if missed:
        for i, bracket in zip(missed, _exact_brackets(keys, [selections[i] for i in missed])):
            brackets[i] = bracket
    return brackets


def _sample_edges(sample: np.ndarray, n: int, selections: list[TopK]) -> list[list[int]] | None:
    """Per selection, descending keys around its k-th largest from a block sample of the n keys: the
    sample's ranks k·m/n ± 5 standard deviations of a binomial count (m sampled of n), plus a few, and up to
    SAMPLE_EDGES ranks between (fewer where they share a bucket). The first edge is one above the key at
    the top rank, so that fewer than k keys reach it unless the sample misleads. None when the pieces
    are too small to give a sample of 256."""
    m = sample.size
    if m < 256:
        return None
    from_top = np.bincount(sample, minlength=_BUCKETS)[::-1].cumsum()
    edges = []
    for selection in selections:
        p = selection.k / n
        expected, spread = p * m, 5 * math.sqrt(m * p * (1 - p)) + 8
        ranks = np.linspace(max(1.0, expected - spread), min(float(m), expected + spread), SAMPLE_EDGES).astype(np.int64)
        keys = _BUCKETS - 1 - np.searchsorted(from_top, ranks)  # the sample's key at each rank (descending)
        # Python ints: a numpy int64 edge would promote every int16 key it is compared with
        edges.append([int(e) for e in np.unique(np.append(keys, min(int(keys[0]) + 1, _BUCKETS)))[::-1]])
    return edges


def _exact_brackets(keys: _KeySlices, selections: list[TopK]) -> list[_Bracket]:
    """Per selection, the single bucket holding its k-th largest key, from a histogram of every key."""
    counts = torch.zeros(_BUCKETS, dtype=torch.int64)
    for _, values in keys:
        counts += torch.bincount(torch.from_numpy(values), minlength=_BUCKETS)
    from_top = counts.flip(0).cumsum(0).numpy()
    brackets = []
    for selection in selections:
        position = int(np.searchsorted(from_top, selection.k))
        bucket = _BUCKETS - 1 - position
        brackets.append(_Bracket(bucket, bucket, int(from_top[position] - counts[bucket])))
    return brackets


def _gather(keys: _KeySlices, brackets: list[_Bracket]) -> None:
    """One pass: positions, keys and exact magnitudes of the entries inside each bracket."""
    for offset, piece, u, values in keys.with_pieces():
        for b in brackets:
            # lo ≤ key ≤ hi in one compare: key − lo wraps to a large uint16 below lo
            inside = np.flatnonzero(np.subtract(values, b.lo, dtype=np.int16).view(np.uint16) <= b.hi - b.lo)
            if inside.size:
                where = torch.from_numpy(inside)
                b.positions.append(where + offset)
                b.keys.append(values[inside])
                b.magnitudes.append(keys.vector.delta(piece, where + u.start).abs())


def _settle(selection: TopK, bracket: _Bracket) -> None:
    """Threshold and cut of `selection` from its gathered bracket (which holds the k-th largest)."""
    need = selection.k - bracket.above  # rank of the k-th largest among the bracket's entries (from the top)
    keys = np.concatenate(bracket.keys)
    counts = np.bincount(keys - bracket.lo, minlength=bracket.hi - bracket.lo + 1)
    from_top = counts[::-1].cumsum()
    position = int(np.searchsorted(from_top, need))
    bucket = bracket.hi - position
    rank = need - int(from_top[position] - counts[bucket - bracket.lo])  # rank inside the bucket
    in_bucket = torch.from_numpy(keys == bucket)
    values = torch.cat(bracket.magnitudes)[in_bucket]
    positions = torch.cat(bracket.positions)[in_bucket]
    threshold = torch.kthvalue(values, values.numel() - rank + 1).values
    ties_kept = rank - int(torch.count_nonzero(values > threshold))
    ties = positions[values == threshold]  # in position order
    selection.threshold = float(threshold)
    selection.cut = selection.n if ties_kept == ties.numel() else int(ties[ties_kept - 1]) + 1


@dataclass
class Selection:
    """How one task vector is sparsified: what is kept of each chunk, and the rescale factor of the kept."""

    keep: Callable[[slice, torch.Tensor], torch.Tensor]  # (flat slice, delta chunk) -> the kept delta
    scale: float = 1.0
    sliceable: bool = True  # keep() may be called on any flat slice (False: only on the fitting pass's chunks)


KEEP_ALL = Selection(lambda s, delta: delta)


def _l1_ratio(before: float, after: float) -> float:
    """mergekit ≥ 0.1.5 rescale: preserve the L1 norm of the task vector (skipped near zero)."""
    return before / after if before >= 1e-7 and after >= 1e-7 else 1.0


def magnitude_selection(vector: Deltas, n: int, density: float, rescale: bool) -> Selection:
    """TIES trimming: keep the max(1, ⌊density·n⌋) entries of largest |delta|."""
    if density >= 1 or n == 0:
        return KEEP_ALL
    top = TopK(max(1, int(density * n)), n)
    total = fit_top_k(vector, [top], with_l1=rescale)
    return Selection(top.keep, _l1_ratio(total, top.kept_l1) if rescale else 1.0)


def breadcrumbs_selection(vector: Deltas, n: int, density: float, gamma: float, rescale: bool) -> Selection:
    """Model breadcrumbs: drop the ⌊gamma·n⌋ largest |delta| (outliers) and the smallest; keep ⌊density·n⌋.

    When density + gamma > 1 fewer outliers are dropped, so ⌊density·n⌋ entries are always kept.
    """
    if density >= 1 or n == 0:
        return KEEP_ALL
    target = int(density * n)
    smallest = max(0, n - target - int(gamma * n))
    upper, outliers = TopK(n - smallest, n), TopK(n - smallest - target, n)
    total = fit_top_k(vector, [upper, outliers], with_l1=rescale)

    def keep(s: slice, delta: torch.Tensor) -> torch.Tensor:
        return upper.keep(s, delta) - outliers.keep(s, delta)  # the outliers are in both: they cancel

    def l1(top: TopK) -> float:
        return 0.0 if top.k <= 0 else total if top.k >= n else top.kept_l1

    return Selection(keep, _l1_ratio(total, l1(upper) - l1(outliers)) if rescale else 1.0)


def derived_generator(generator: torch.Generator | None) -> np.random.Generator:
    """A generator of its own (numpy's PCG64), seeded from `generator`, so each input's draws do not depend on
    the others'. numpy rather than torch: uniform draws and the comparison with the keep probability cost
    8 ms per 2.9 M entries against 26 ms for `torch.rand(...) < p` (DARE draws one per entry of each input)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return np.random.Generator(np.random.PCG64(seed))


def random_selection(
    chunks: Chunks, n: int, density: float, rescale: bool, generator: np.random.Generator
) -> Selection:
    """DARE: keep each entry independently with probability `density` (a uniform float32 below it; draws from
    `generator`, which this selection then owns: it is rewound between the fitting and the applying pass)."""
    if density >= 1 or n == 0:
        return KEEP_ALL

    def mask(s: slice, delta: torch.Tensor) -> np.ndarray:
        return generator.random(tuple(delta.shape), dtype=np.float32) < density

    return _with_replay(chunks, mask, generator, rescale)


def della_selection(
    chunks: Chunks, n: int, row: int, density: float, epsilon: float, rescale: bool, generator: np.random.Generator
) -> Selection:
    """DELLA (MagPrune): within each row, keep probability rises linearly with the magnitude's rank, from
    density − ε for the smallest entry to density + ε for the largest."""
    if density >= 1 or n == 0:
        return KEEP_ALL

    def mask(s: slice, delta: torch.Tensor) -> np.ndarray:
        rows = delta.reshape(-1, row)
        ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float32)
        probability = (density - epsilon) + 2 * epsilon * ranks / max(row - 1, 1)
        keep = generator.random(tuple(rows.shape), dtype=np.float32) < probability.numpy()
        return keep.reshape(tuple(delta.shape))

    return _with_replay(chunks, mask, generator, rescale)


def _with_replay(chunks: Chunks, mask, generator: np.random.Generator, rescale: bool) -> Selection:
    """The masks are numpy booleans and applied by numpy: a float-by-bool product is 3× faster there than in
    torch (1.4 against 4.4 ms on 2.9 M entries), and so is a float64 sum of float32 values."""
    state = generator.bit_generator.state
    scale = 1.0
    drawn: dict[int, np.ndarray] = {}  # the mask of a one-chunk tensor, kept for the second pass
    if rescale:  # a first pass for the norms; the generator is rewound so the second draws the same mask
        before = after = 0.0
        for count, (s, delta) in enumerate(chunks()):
            keep = mask(s, delta)
            magnitude = delta.abs().numpy()
            before += float(np.sum(magnitude, dtype=np.float64))  # float64: the same sum whatever the chunks
            after += float(np.sum(np.multiply(magnitude, keep, out=magnitude), dtype=np.float64))
            drawn.clear() if count else drawn.update({s.start: keep})
        scale = _l1_ratio(before, after)
        generator.bit_generator.state = state

    def kept(s: slice, delta: torch.Tensor) -> torch.Tensor:
        keep = drawn.pop(s.start, None)
        return torch.from_numpy(delta.numpy() * (keep if keep is not None else mask(s, delta)))

    return Selection(kept, scale, sliceable=False)


def elected_sign(weighted_sum: torch.Tensor) -> torch.Tensor:
    """TIES election: +1 where Σᵢ wᵢδᵢ ≥ 0, else −1. An input agrees where its weighted delta has this sign
    (zero deltas never agree, so they do not count in the disjoint mean).

    (copysign gives −1 at −0.0, which only arises when every weighted delta is zero: nothing agrees there
    either way.)"""
    one = _ONE.get(weighted_sum.dtype)
    return torch.copysign(one if one is not None else torch.ones((), dtype=weighted_sum.dtype), weighted_sum)


_ONE = {dtype: torch.ones((), dtype=dtype) for dtype in (torch.float32, torch.float64)}  # made once: called per slice
