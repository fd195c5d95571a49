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


# -- the paper's analysis: how well tokens and representations line up with phones ---------------------------


def phone_alignment(tokens: np.ndarray, phones: np.ndarray) -> dict:
    """HuBERT's measures of hard tokens against frame phone labels: phone purity (Σ_k max_p P(k, p), how
    predictable the phone is from the token), cluster purity (Σ_p max_k P(k, p)) and PNMI = I(p; k) / H(p)."""
    from scipy.stats import entropy
    from sklearn.metrics import mutual_info_score
    from sklearn.metrics.cluster import contingency_matrix

    joint = contingency_matrix(phones, tokens)  # (phones, tokens) counts
    n = joint.sum()
    _, counts = np.unique(phones, return_counts=True)
    return {"phone_purity": float(joint.max(0).sum() / n), "cluster_purity": float(joint.max(1).sum() / n),
            "pnmi": float(mutual_info_score(phones, tokens) / entropy(counts)), "frames": int(n)}


def phone_separability(x: np.ndarray, phones: np.ndarray, train: np.ndarray, seed: int = 0,
                       max_iter: int = 300) -> dict:
    """How separable the phones are in representation ``x`` (N, D): the ratio of between- to within-phone
    variance, trace(S_B) / trace(S_W), and the accuracy of a linear probe (logistic regression) trained on the
    frames where ``train`` is True and scored on the others (split by utterance, so no utterance is in both)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(0)
    between = within = 0.0
    for ph in np.unique(phones):
        xp = x[phones == ph]
        mp = xp.mean(0)
        between += len(xp) * float(((mp - mean) ** 2).sum())
        within += float(((xp - mp) ** 2).sum())
    scaler = StandardScaler().fit(x[train])
    probe = LogisticRegression(max_iter=max_iter, random_state=seed).fit(scaler.transform(x[train]), phones[train])
    acc = float((probe.predict(scaler.transform(x[~train])) == phones[~train]).mean())
    return {"between_within": between / max(within, 1e-12), "probe_accuracy": acc}
