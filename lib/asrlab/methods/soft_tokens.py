"""Soft distributions over SSL-derived discrete tokens (Onda, Fukayama, Saito, Minematsu; arXiv 2606.06806).

Tokens are k-means clusters of one layer of a self-supervised model. The downstream model is trained on the
hard token, one id per frame; at inference each frame ``x`` is replaced by a distribution over all K
centroids ``c_k`` (the paper's soft assignment)::

    p(k | x) = exp(-d(x, c_k) / τ) / Σ_j exp(-d(x, c_j) / τ),       d = Euclidean distance

and the downstream model's input is the soft embedding ``Σ_k p(k | x) E_k = p @ E`` over its own
token-embedding table E. τ → 0 recovers the hard lookup ``E[argmin_k d(x, c_k)]``; τ → ∞ tends to the mean
embedding. ``top_k`` (optional) keeps the k nearest centroids and renormalises.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import MiniBatchKMeans


def fit_kmeans(frames: np.ndarray, k: int, seed: int = 0, batch_size: int = 4096, max_iter: int = 50,
               n_init: int = 1) -> np.ndarray:
    """Centroids (k, D) float32 of MiniBatchKMeans on ``frames`` (N, D); deterministic for a seed."""
    if frames.ndim != 2 or len(frames) < k:
        raise ValueError(f"k-means needs at least k={k} frames of shape (N, D), got {frames.shape}")
    km = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=batch_size, max_iter=max_iter,
                         n_init=n_init, compute_labels=False)
    km.fit(np.asarray(frames, dtype=np.float32))
    return km.cluster_centers_.astype(np.float32)


def distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """d(x, c_k): Euclidean distance of every frame (…, D) to every centroid (K, D) -> (…, K)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    return torch.cdist(flat, centroids.float()).reshape(*x.shape[:-1], centroids.shape[0])


def hard_assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The hard token: index of the nearest centroid, (…,) int64."""
    return distances(x, centroids).argmin(-1)


def soft_assign(x: torch.Tensor, centroids: torch.Tensor, tau: float, top_k: int | None = None) -> torch.Tensor:
    """p(k | x) = softmax_k(−d(x, c_k)/τ) (…, K) float32; τ = 0 gives the one-hot of the hard token."""
    if tau < 0:
        raise ValueError(f"temperature τ must be ≥ 0, got {tau}")
    d = distances(x, centroids)
    if tau == 0:
        return torch.nn.functional.one_hot(d.argmin(-1), d.shape[-1]).float()
    logits = -d / tau
    if top_k is not None and top_k < d.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.softmax(-1)


def soft_embedding(p: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """Σ_k p_k E_k: the distribution (…, K) times the token-embedding table E (K, d) -> (…, d)."""
    return p.to(embedding.dtype) @ embedding
