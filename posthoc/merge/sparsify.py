"""Kernels of the task-arithmetic family: select entries of a task vector, rescale, vote on signs.

Task vectors are processed in chunks of whole rows (about a million entries each), so merging an
embedding matrix never holds more than the inputs, the output and a few chunk-sized temporaries.
Selections that depend on the whole tensor (the top-k magnitudes of TIES and breadcrumbs, the L1 norms of
a rescale) are fitted in a first pass over the chunks and applied in the second:

- `TopK` finds the k-th largest magnitude exactly without sorting: a histogram of the top 16 bits of the
  float32 bit patterns (order-preserving for non-negative floats) locates the bucket that holds it, and
  only that bucket's values are compared. Among equal magnitudes at the threshold, the lowest flat indices
  are kept, so exactly k entries survive whatever the chunking.
- Random selections (DARE, DELLA) draw from a generator whose state is saved after fitting and replayed,
  so both passes see the same mask and a seed gives the same merge.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

CHUNK_ELEMENTS = 1 << 20
_BUCKET_SHIFT = 16
_BUCKETS = 1 << (31 - _BUCKET_SHIFT)  # non-negative float32 patterns, NaN included, have the top bit clear

Chunks = Callable[[], Iterator[tuple[slice, torch.Tensor]]]  # a fresh pass: (flat slice, delta chunk)


def row_chunks(shape: torch.Size | tuple[int, ...], chunk_elements: int = CHUNK_ELEMENTS) -> list[slice]:
    """Flat slices of whole rows (rows = first dimension) holding about `chunk_elements` entries each."""
    n = 1
    for s in shape:
        n *= s
    if n == 0:
        return []
    row = n // shape[0] if len(shape) > 1 and shape[0] else n
    rows_per_chunk = max(1, chunk_elements // row)
    step = rows_per_chunk * row
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _buckets(magnitude: torch.Tensor) -> torch.Tensor:
    return magnitude.to(torch.float32).view(torch.int32) >> _BUCKET_SHIFT


class TopK:
    """Keep the k entries of largest magnitude over a whole tensor that arrives in chunks."""

    def __init__(self, k: int, n: int):
        self.k, self.n = k, n
        self.threshold = 0.0
        self.quota = 0  # how many entries equal to the threshold are kept (the first ones by index)
        self.kept_l1 = 0.0
        self._bucket = -1
        self._above = 0
        self._above_l1 = 0.0
        self._seen_ties = 0

    @property
    def keeps_all(self) -> bool:
        return self.k >= self.n

    def locate(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        """Pick the bucket of the k-th largest value from the histogram of the whole tensor."""
        if self.k <= 0 or self.keeps_all:
            return
        from_top = counts.flip(0).cumsum(0)
        position = int(torch.searchsorted(from_top, torch.tensor(self.k, dtype=from_top.dtype)))
        self._bucket = _BUCKETS - 1 - position
        self._above = int(from_top[position] - counts[self._bucket])
        self._above_l1 = float(sums[self._bucket + 1 :].sum())

    def settle(self, inside: torch.Tensor) -> None:
        """Exact threshold from the values that fell in the chosen bucket."""
        if self.k <= 0 or self.keeps_all:
            return
        rank = self.k - self._above  # rank of the threshold inside the bucket, from the top
        value = torch.kthvalue(inside, inside.numel() - rank + 1).values
        greater = inside > value
        self.threshold = float(value)
        self.quota = rank - int(greater.sum())
        self.kept_l1 = self._above_l1 + float(inside[greater].sum()) + self.quota * self.threshold

    def restart(self) -> None:
        self._seen_ties = 0

    def mask(self, magnitude: torch.Tensor) -> torch.Tensor:
        """Mask of one chunk; chunks must come in order (ties are kept by index, across chunks)."""
        if self.keeps_all:
            return torch.ones_like(magnitude, dtype=torch.bool)
        if self.k <= 0:
            return torch.zeros_like(magnitude, dtype=torch.bool)
        keep = magnitude > self.threshold
        ties = magnitude == self.threshold
        count = int(ties.sum())
        if count:
            remaining = self.quota - self._seen_ties
            if remaining < count:
                ties &= torch.cumsum(ties, 0) <= max(remaining, 0)
            keep |= ties
            self._seen_ties += count
        return keep


def fit_top_k(chunks: Chunks, selections: list[TopK]) -> float:
    """Two passes: histogram, then the bucket values; fits every selection. Returns Σ|delta|."""
    active = [s for s in selections if 0 < s.k < s.n]
    counts = torch.zeros(_BUCKETS, dtype=torch.int64)
    sums = torch.zeros(_BUCKETS, dtype=torch.float64)
    total = 0.0
    for _, delta in chunks():
        magnitude = delta.abs()
        buckets = _buckets(magnitude).reshape(-1)
        counts += torch.bincount(buckets, minlength=_BUCKETS)
        sums += torch.bincount(buckets, weights=magnitude.reshape(-1).double(), minlength=_BUCKETS)
        total += float(magnitude.sum(dtype=torch.float64))
    if not active:
        return total
    for selection in active:
        selection.locate(counts, sums)
    wanted = {s._bucket for s in active}
    inside: dict[int, list[torch.Tensor]] = {b: [] for b in wanted}
    for _, delta in chunks():
        magnitude = delta.abs().reshape(-1)
        buckets = _buckets(magnitude)
        for b in wanted:
            inside[b].append(magnitude[buckets == b])
    for selection in active:
        selection.settle(torch.cat(inside[selection._bucket]))
    return total


@dataclass
class Selection:
    """How one task vector is sparsified: a per-chunk mask and the rescale factor of the kept entries."""

    mask: Callable[[slice, torch.Tensor], torch.Tensor | None]
    scale: float = 1.0
    restart: Callable[[], None] = lambda: None


def _l1_ratio(before: float, after: float) -> float:
    """mergekit ≥ 0.1.5 rescale: preserve the L1 norm of the task vector (skipped near zero)."""
    return before / after if before >= 1e-7 and after >= 1e-7 else 1.0


def magnitude_selection(chunks: Chunks, n: int, density: float, rescale: bool) -> Selection:
    """TIES trimming: keep the max(1, ⌊density·n⌋) entries of largest |delta|."""
    if density >= 1 or n == 0:
        return Selection(lambda s, d: None)
    top = TopK(max(1, int(density * n)), n)
    total = fit_top_k(chunks, [top])
    return Selection(lambda s, d: top.mask(d.abs()), _l1_ratio(total, top.kept_l1) if rescale else 1.0, top.restart)


def breadcrumbs_selection(chunks: Chunks, n: int, density: float, gamma: float, rescale: bool) -> Selection:
    """Model breadcrumbs: drop the ⌊gamma·n⌋ largest |delta| (outliers) and the smallest; keep ⌊density·n⌋.

    When density + gamma > 1 fewer outliers are dropped, so ⌊density·n⌋ entries are always kept.
    """
    if density >= 1 or n == 0:
        return Selection(lambda s, d: None)
    target = int(density * n)
    smallest = max(0, n - target - int(gamma * n))
    upper, outliers = TopK(n - smallest, n), TopK(n - smallest - target, n)
    total = fit_top_k(chunks, [upper, outliers])

    def mask(s: slice, delta: torch.Tensor) -> torch.Tensor:
        magnitude = delta.abs()
        return upper.mask(magnitude) & ~outliers.mask(magnitude)

    def restart() -> None:
        upper.restart()
        outliers.restart()

    kept = upper.kept_l1 if upper.k < n else total
    kept -= outliers.kept_l1 if 0 < outliers.k < n else (total if outliers.k >= n else 0.0)
    return Selection(mask, _l1_ratio(total, kept) if rescale else 1.0, restart)


def _replayable(generator: torch.Generator | None) -> torch.Generator:
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator().manual_seed(seed)


def random_selection(
    chunks: Chunks, n: int, density: float, rescale: bool, generator: torch.Generator | None
) -> Selection:
    """DARE: keep each entry independently with probability `density`."""
    if density >= 1 or n == 0:
        return Selection(lambda s, d: None)
    own = _replayable(generator)
    state = own.get_state()

    def mask(s: slice, delta: torch.Tensor) -> torch.Tensor:
        return torch.rand(delta.shape, generator=own, dtype=torch.float32) < density

    return _with_replay(chunks, mask, own, state, rescale)


def della_selection(
    chunks: Chunks, n: int, row: int, density: float, epsilon: float, rescale: bool, generator: torch.Generator | None
) -> Selection:
    """DELLA (MagPrune): within each row, keep probability rises linearly with the magnitude's rank, from
    density − ε for the smallest entry to density + ε for the largest."""
    if density >= 1 or n == 0:
        return Selection(lambda s, d: None)
    own = _replayable(generator)
    state = own.get_state()

    def mask(s: slice, delta: torch.Tensor) -> torch.Tensor:
        rows = delta.reshape(-1, row)
        ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float32)
        probability = (density - epsilon) + 2 * epsilon * ranks / max(row - 1, 1)
        keep = torch.rand(rows.shape, generator=own, dtype=torch.float32) < probability
        return keep.reshape(delta.shape)

    return _with_replay(chunks, mask, own, state, rescale)


def _with_replay(chunks: Chunks, mask, own: torch.Generator, state: torch.Tensor, rescale: bool) -> Selection:
    scale = 1.0
    if rescale:  # a first pass for the norms; the generator is rewound so the second draws the same mask
        before = after = 0.0
        for s, delta in chunks():
            magnitude = delta.abs()
            before += float(magnitude.sum(dtype=torch.float64))
            after += float((magnitude * mask(s, delta)).sum(dtype=torch.float64))
        scale = _l1_ratio(before, after)
    return Selection(mask, scale, lambda: own.set_state(state))


def sign_consensus(weighted: list[torch.Tensor]) -> list[torch.Tensor]:
    """TIES election: the sign of Σᵢ wᵢδᵢ per entry (≥ 0 counts as +); per input, the mask of its agreeing,
    non-zero entries."""
    total = weighted[0].clone()
    for delta in weighted[1:]:
        total += delta
    positive = total >= 0
    return [torch.where(positive, delta > 0, delta < 0) for delta in weighted]
