"""Low-rank factors: truncated SVD of a change, rank by energy, and exact re-factoring of LoRA sums.

Conventions: a change φ (m, n) is factored as B (m, r) @ A (r, n) with B = U√S, A = √S Vᵀ (the split
mergekit-extract-lora uses; it balances the two factors' norms). Errors are relative Frobenius errors
‖φ − BA‖ / ‖φ‖, and "energy kept" is 1 − error², the share of ‖φ‖² the factors reproduce.

Sums of LoRAs never form the (m, n) matrix: Σ cᵢ BᵢAᵢ = [c₁B₁ … cₙBₙ] [A₁; …; Aₙ] exactly (no
cross-terms), and re-factoring that to rank R takes a QR of each stack and an SVD of the small core:

    [c·B] = Q_B R_B,  [A]ᵀ = Q_A R_A,  R_B R_Aᵀ = U S Vᵀ   =>   Σ cᵢBᵢAᵢ = (Q_B U) S (Q_A V)ᵀ

Q_B U and Q_A V have orthonormal columns, so keeping the top R singular values is the best rank-R
approximation and its error is exactly √(Σ_{j>R} S_j²): known without ever forming the sum.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from posthoc.threads import torch_threads

RANDOMIZED_MIN_DIM = 1024  # below this a full SVD is as fast as a randomized one
RANDOMIZED_MAX_FRACTION = 8  # randomized only when rank ≤ min(m, n) / 8
# Sketch width 2r + 10 and 6 power iterations: on flat spectra (a TIES merge of LoRAs, 1024×2816, rank 16)
# the sketch of r + 10 with 4 iterations kept 1 % less energy than the best rank-r; this keeps all but
# 0.01 % of it, still ~12× faster than a full SVD there (benchmarks/lora_merge_vs_peft.py).
OVERSAMPLE = 10
POWER_ITERATIONS = 6


SMALL_ELEMENTS = 1 << 18  # decompositions of matrices below this size run on one thread


@contextmanager
def _threads_for(elements: int) -> Iterator[None]:
    """One thread for small decompositions: LAPACK's thread start-up (and spinning on a busy machine) costs
    far more than the work, e.g. 0.7 s instead of 1 ms for a 100×32 SVD on two loaded cores."""
    if elements >= SMALL_ELEMENTS:
        yield
        return
    with torch_threads(1):
        yield


def uses_randomized(shape: tuple[int, int], rank: int) -> bool:
    small = min(shape)
    return small >= RANDOMIZED_MIN_DIM and rank * RANDOMIZED_MAX_FRACTION <= small


def truncated_svd(phi: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` (U (m, r), S (r,), Vh (r, n)) of a float matrix.

    For large matrices and small ranks a randomized SVD (Halko et al.; torch.svd_lowrank with a few power
    iterations) is much faster than a full one and nearly as accurate; the caller measures the actual
    error of what it keeps either way.
    """
    phi = phi.to(torch.float32)
    with _threads_for(phi.numel()):
        if uses_randomized(tuple(phi.shape), rank):
            q = min(2 * rank + OVERSAMPLE, min(phi.shape))
            U, S, V = torch.svd_lowrank(phi, q=q, niter=POWER_ITERATIONS)
            return U[:, :rank], S[:rank], V[:, :rank].T
        U, S, Vh = torch.linalg.svd(phi, full_matrices=False)
    return U[:, :rank], S[:rank], Vh[:rank]


def split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B = U√S, A = √S Vᵀ."""
    root = S.clamp(min=0).sqrt()
    return (U * root).contiguous(), (root[:, None] * Vh).contiguous()


def relative_error(phi: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> float:
    """‖φ − BA‖ / ‖φ‖ (0 for a zero φ), measured, not estimated."""
    norm = float(torch.linalg.vector_norm(phi))
    if norm == 0:
        return 0.0
    residual = torch.addmm(phi.to(torch.float32), B, A, alpha=-1.0)
    return float(torch.linalg.vector_norm(residual)) / norm


def rank_for_energy(phi: torch.Tensor, energy: float, max_rank: int | None) -> int:
    """The smallest rank whose singular values keep `energy` of ‖φ‖² (at most `max_rank`)."""
    with _threads_for(phi.numel()):
        squares = torch.linalg.svdvals(phi.to(torch.float32)).to(torch.float64).square()
    total = float(squares.sum())
    if total == 0:
        return 1
    kept = torch.cumsum(squares, 0) / total
    rank = int(torch.searchsorted(kept, torch.tensor([energy - 1e-12], dtype=torch.float64)).item()) + 1
    rank = min(rank, squares.numel())
    return min(rank, max_rank) if max_rank is not None else rank


def factor(phi: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """B (m, r), A (r, n) with BA the (near-)best rank-r approximation of φ, and its measured relative error."""
    rank = max(1, min(rank, *phi.shape))
    B, A = split(*truncated_svd(phi, rank))
    return B, A, relative_error(phi, B, A)


def lora_is_smaller(shape: tuple[int, int], rank: int) -> bool:
    """Whether rank-r factors hold fewer numbers than the matrix (else the full matrix is stored: exact)."""
    m, n = shape
    return rank * (m + n) < m * n


def refactor(
    Bs: list[torch.Tensor], As: list[torch.Tensor], rank: int | None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Σ Bᵢ Aᵢ as one pair of factors of rank ≤ `rank` (None: the numerical rank), and the exact relative error.

    Bᵢ (m, rᵢ) already carry their coefficients (negative ones included); ranks may differ. Computed in
    float64 (the stacks are thin, so this is cheap) and returned in float32.
    """
    B = torch.cat([b.to(torch.float64) for b in Bs], dim=1)  # (m, k)
    A = torch.cat([a.to(torch.float64) for a in As], dim=0)  # (k, n)
    with _threads_for(B.numel() + A.numel()):
        q_b, r_b = torch.linalg.qr(B)  # (m, k'), (k', k)
        q_a, r_a = torch.linalg.qr(A.T)  # (n, k''), (k'', k)
        U, S, Vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # core (k', k'')
    squares = S.square()
    total = float(squares.sum())
    if total == 0:
        zero_b = torch.zeros(B.shape[0], 1, dtype=torch.float32)
        return zero_b, torch.zeros(1, A.shape[1], dtype=torch.float32), 0.0
    tolerance = float(S[0]) * max(B.shape[0], A.shape[1]) * torch.finfo(torch.float64).eps
    numerical = int(torch.count_nonzero(S.gt(tolerance)))
    keep = max(1, min(numerical, rank) if rank is not None else numerical)
    root = S[:keep].sqrt()
    new_b = q_b @ (U[:, :keep] * root)
    new_a = (root[:, None] * Vh[:keep]) @ q_a.T
    error = math.sqrt(max(float(squares[keep:].sum()), 0.0) / total)
    return new_b.to(torch.float32).contiguous(), new_a.to(torch.float32).contiguous(), error
