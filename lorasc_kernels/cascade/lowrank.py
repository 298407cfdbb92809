"""Small linear algebra on low-rank updates ``Σ_t B_t A_t``, never forming the product.

A sum of T rank-r updates is one product ``B A`` of stacked factors ``B = [B_0, …]``
(N, R) and ``A = [A_0; …]`` (R, K), ``R = r·T``. Its singular values come from the QR
factorizations ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` and the SVD of the small core
``R_B R_Aᵀ`` (at most R × R): ``B A = (Q_B U) diag(S) (Q_A V)ᵀ``. Cost ``O((N + K) R²)``,
in float64.

:class:`LowRankSum` keeps such a sum as it grows, one pair at a time, without the stacked
factors: an addition costs ``O((N + K)·p·r)`` instead of a new ``O((N + K)·R²)``
factorization (``p ≤ min(R, N, K)``, see there).
"""

from __future__ import annotations

import math

import torch

__all__ = ["LowRankSum", "effective_rank", "lowrank_svd", "stacked", "truncated"]


def stacked(pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B (N, R), A (R, K))`` stacking ``pairs`` of ``(B_t (N, r_t), A_t (r_t, K))``."""
    return torch.cat([b for b, _ in pairs], dim=1), torch.cat([a for _, a in pairs], dim=0)


def lowrank_svd(lora_b: torch.Tensor, lora_a: torch.Tensor):
    """``(U (N, q), S (q,), Vh (q, K))`` of ``B A`` in float64, ``q = min(N, K, R)``,
    singular values in descending order; ``B`` (N, R), ``A`` (R, K)."""
    q_b, r_b = torch.linalg.qr(lora_b.detach().to(torch.float64))
    q_a, r_a = torch.linalg.qr(lora_a.detach().to(torch.float64).T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return q_b @ u, s, vh @ q_a.T


def effective_rank(singular_values: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank ``exp(−Σ p_i log p_i)``, ``p_i = σ_i / Σ_j σ_j``
    (0 for a zero matrix): between 1 and the rank, equal to it when the σ are equal."""
    s = singular_values.detach().to(torch.float64)
    total = float(s.sum())
    if total == 0.0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def truncated(lora_b: torch.Tensor, lora_a: torch.Tensor, rank: int):
    """The best rank-``rank`` approximation of ``B A`` as float32 factors ``(B' (N, k),
    A' (k, K))``, ``k = min(rank, q)``, and its relative Frobenius error
    ``‖B A − B' A'‖ / ‖B A‖`` (0 for a zero product), from :func:`lowrank_svd`."""
    u, s, vh = lowrank_svd(lora_b, lora_a)
    k = min(rank, s.numel())
    total = float(s.square().sum())
    error = math.sqrt(float(s[k:].square().sum()) / total) if total > 0 else 0.0
    return (u[:, :k] * s[:k]).to(torch.float32), vh[:k].to(torch.float32).contiguous(), error


class LowRankSum:
    """``Σ_t B_t A_t`` kept as ``Q_B C Q_Aᵀ`` in float64 as pairs are added: ``Q_B`` (N, p)
    and ``Q_A`` (K, q) orthonormal, the core ``C`` (p, q), so the sum's singular values are
    those of ``C``; ``p ≤ min(R, N)``, ``q ≤ min(R, K)`` for ``R = Σ_t r_t``.

    :meth:`add` projects ``B_t`` (N, r) and ``A_tᵀ`` (K, r) on the bases (block
    Gram-Schmidt, orthogonalized twice), extends each by the directions it lacks and adds
    ``C_B C_Aᵀ`` to the core: ``O((N + K)·p·r + p·q·r)``. :meth:`singular_values` costs
    ``O(p·q·min(p, q))``. Once ``p = N`` and ``q = K`` the core is the dense sum in
    rotated coordinates and the costs stop growing with the pairs added. A direction whose
    residual after projection is below ``n·ε·‖B_t‖_F`` (rounding) is not added.
    """

    def __init__(self):
        self.count = 0  # pairs added
        self.basis_b = self.basis_a = self.core = None

    def add(self, lora_b: torch.Tensor, lora_a: torch.Tensor) -> None:
        """Add ``B A``: ``B`` (N, r), ``A`` (r, K), of the first pair's N and K."""
        lora_b = lora_b.detach().to("cpu", torch.float64)
        lora_a = lora_a.detach().to("cpu", torch.float64).T
        if self.core is None:
            self.basis_b = lora_b.new_zeros(lora_b.shape[0], 0)
            self.basis_a = lora_a.new_zeros(lora_a.shape[0], 0)
            self.core = lora_b.new_zeros(0, 0)
        self.basis_b, coeff_b = _extended(self.basis_b, lora_b)
        self.basis_a, coeff_a = _extended(self.basis_a, lora_a)
        core = self.core.new_zeros(coeff_b.shape[0], coeff_a.shape[0])
        core[: self.core.shape[0], : self.core.shape[1]] = self.core
        self.core = core.addmm_(coeff_b, coeff_a.T)
        self.count += 1

    def singular_values(self) -> torch.Tensor:
        """The sum's nonzero-candidate singular values (``min(p, q)``), descending, float64."""
        if self.core is None:
            return torch.zeros(0, dtype=torch.float64)
        return torch.linalg.svdvals(self.core)


def _extended(basis: torch.Tensor, columns: torch.Tensor):
    """``(basis', coords)``: ``basis`` (n, p) orthonormal, extended by the directions of
    ``columns`` (n, r) it lacks, and the coordinates (p', r) of ``columns`` in it."""
    coords = basis.T @ columns
    residual = columns - basis @ coords
    again = basis.T @ residual  # a second pass: orthogonal to working precision
    residual -= basis @ again
    coords += again
    room = basis.shape[0] - basis.shape[1]
    if room == 0:
        return basis, coords
    u, s, _ = torch.linalg.svd(residual, full_matrices=False)
    tolerance = basis.shape[0] * torch.finfo(torch.float64).eps * float(columns.norm())
    kept = min(int((s > tolerance).sum()), room)
    if kept == 0:
        return basis, coords
    new = u[:, :kept]
    new = torch.linalg.qr(new - basis @ (basis.T @ new))[0]
    return torch.cat([basis, new], dim=1), torch.cat([coords, new.T @ residual])
