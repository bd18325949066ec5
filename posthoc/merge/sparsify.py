"""Small tensor kernels of the task-arithmetic family: sparsify a task vector, rescale it, vote on signs.

Every function takes float tensors and returns new tensors or boolean masks; none does I/O. Masks keep
exactly the number of entries the method asks for: among equal magnitudes at the threshold the lower
flat indices win, so results do not depend on a sort's tie order.
"""

from __future__ import annotations

import torch

_HIGH_BITS = 16  # float32 magnitudes are bucketed by their top bits before the exact selection


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry (1-based) of a flat tensor of non-negative floats, exactly.

    Sorting a whole tensor to find one threshold is what makes TIES slow; here a histogram of the top
    16 bits of the float32 bit patterns (order-preserving for non-negative floats) finds the bucket
    holding the k-th value in one pass, and `kthvalue` runs on that bucket only.
    """
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside [1, {n}]")
    if values.dtype != torch.float32:
        return torch.kthvalue(values.reshape(-1), n - k + 1).values
    flat = values.reshape(-1)
    buckets = flat.view(torch.int32) >> _HIGH_BITS  # 0 .. 2^15 for non-negative floats (NaN included)
    counts = torch.bincount(buckets, minlength=1 << (32 - _HIGH_BITS - 1))
    from_top = counts.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor(k, dtype=from_top.dtype)))
    bucket = counts.numel() - 1 - position
    above = int(from_top[position]) - int(counts[bucket])
    inside = flat[buckets == bucket]
    return torch.kthvalue(inside, inside.numel() - (k - above) + 1).values


def top_k_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries (ties at the threshold: lowest flat indices first)."""
    flat = magnitude.reshape(-1)
    if k <= 0:
        return torch.zeros_like(flat, dtype=torch.bool).reshape(magnitude.shape)
    if k >= flat.numel():
        return torch.ones_like(flat, dtype=torch.bool).reshape(magnitude.shape)
    threshold = kth_largest(flat, k)
    mask = flat > threshold
    missing = k - int(mask.sum())
    if missing > 0:
        mask[torch.nonzero(flat == threshold).squeeze(1)[:missing]] = True
    return mask.reshape(magnitude.shape)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor | None:
    """TIES trimming: keep the max(1, ⌊density·n⌋) entries of largest |delta|. None means keep all."""
    if density >= 1 or delta.numel() == 0:
        return None
    return top_k_mask(delta.abs(), max(1, int(density * delta.numel())))


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor | None:
    """Model breadcrumbs: drop the ⌊gamma·n⌋ largest |delta| (outliers) and the smallest, keep ⌊density·n⌋.

    When density + gamma > 1 fewer outliers are dropped, so the kept count stays ⌊density·n⌋.
    """
    n = delta.numel()
    if density >= 1 or n == 0:
        return None
    target = int(density * n)
    outliers = int(gamma * n)
    smallest = max(0, n - target - outliers)
    magnitude = delta.abs()
    return top_k_mask(magnitude, n - smallest) & ~top_k_mask(magnitude, n - smallest - target)


def random_mask(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor | None:
    """DARE: keep each entry independently with probability `density`."""
    if density >= 1:
        return None
    return torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density


def della_mask(
    delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator | None
) -> torch.Tensor | None:
    """DELLA (MagPrune): per row, keep probability rises linearly with magnitude rank.

    The smallest entry of a row is kept with probability density − ε, the largest with density + ε.
    """
    if density >= 1:
        return None
    rows = delta.reshape(1, -1) if delta.dim() <= 1 else delta.reshape(delta.shape[0], -1)
    n = rows.shape[1]
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float32)  # 0 .. n-1 within each row
    position = ranks / max(n - 1, 1)
    probability = (density - epsilon) + 2 * epsilon * position
    keep = torch.rand(rows.shape, generator=generator, dtype=torch.float32) < probability
    return keep.reshape(delta.shape)


def apply_mask(delta: torch.Tensor, mask: torch.Tensor | None, rescale: bool) -> torch.Tensor:
    """Zero what the mask drops; with `rescale`, scale the rest so the L1 norm is preserved.

    (mergekit ≥ 0.1.5 semantics: the ratio Σ|delta| / Σ|kept| over the whole tensor, skipped when either
    sum is below 1e-7, rather than DARE's original 1/density.)
    """
    if mask is None:
        return delta
    kept = delta * mask
    if rescale:
        before = float(delta.abs().sum())
        after = float(kept.abs().sum())
        if before >= 1e-7 and after >= 1e-7:
            kept *= before / after
    return kept


def sign_consensus(weighted_deltas: list[torch.Tensor]) -> list[torch.Tensor]:
    """TIES election: the sign of Σᵢ wᵢδᵢ per entry (≥ 0 counts as +); a mask per input of agreeing,
    non-zero entries."""
    total = torch.zeros_like(weighted_deltas[0])
    for delta in weighted_deltas:
        total += delta
    majority = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    return [torch.sign(delta) == majority for delta in weighted_deltas]
