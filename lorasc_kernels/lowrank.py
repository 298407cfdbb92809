"""Small linear algebra on low-rank updates ``Σ_t B_t A_t``, never forming the product.

A sum of T rank-r updates is one product ``B A`` of stacked factors ``B = [B_0, …]``
(N, R) and ``A = [A_0; …]`` (R, K), ``R = r·T``. Its singular values come from the QR
factorizations ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` and the SVD of the small core
``R_B R_Aᵀ`` (at most R × R): ``B A = (Q_B U) diag(S) (Q_A V)ᵀ``. Cost ``O((N + K) R²)``,
in float64.
"""

from __future__ import annotations

import math

import torch

__all__ = ["effective_rank", "lowrank_svd", "stacked", "truncated"]


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
