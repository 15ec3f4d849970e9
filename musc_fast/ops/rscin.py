"""RsCIN (SPEC 5.1): re-score image scores by averaging them over each image's nearest class tokens.

For each window k: keep the k largest entries of every row of the class-token Gram matrix W, make the
kept rows stochastic, and average the min-max normalised scores with them. The output is the mean over
the windows. Vectorised: one top-k per window instead of the original's Python loop over rows.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch


def cls_gram(cls_tokens) -> np.ndarray:
    """W = F F^T as the original computes it, returned as float64 [N, N].

    fp16 tokens (CLIP under autocast) are multiplied by numpy in fp16, exactly as the original does
    (numpy accumulates in fp32 and rounds once to fp16); any other dtype is multiplied in float64.
    bf16 tensors (numpy has no bf16) are widened to float32 first, which is exact.

    Args:
        cls_tokens: [N, D] numpy array or torch tensor (any float dtype, bf16 included).
    """
    if isinstance(cls_tokens, torch.Tensor):
        t = cls_tokens.detach().cpu()
        f = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    else:
        f = np.asarray(cls_tokens)
    if f.dtype == np.float16:
        return np.dot(f, f.T).astype(np.float64)
    f = f.astype(np.float64)
    return f @ f.T


def window_keep_mask(gram: np.ndarray, k: int) -> np.ndarray:
    """Which entries row i keeps for window k: its k largest (ties at the cut go to the lowest index).

    The original zeroes the N-k smallest entries with an unstable top-k, so which of several tied
    entries survives is arbitrary there (golden README, quirk 6); here it is deterministic.

    Args:
        gram: [N, N]. Returns: [N, N] bool with k True per row.
    """
    n = gram.shape[0]
    order = np.argsort(-gram, axis=1, kind="stable")[:, :k]
    keep = np.zeros((n, n), dtype=bool)
    np.put_along_axis(keep, order, True, axis=1)
    return keep


def normalise_scores(scores: np.ndarray, compat: bool = False) -> np.ndarray:
    """(s - min) / (max - min). Constant scores: NaN with compat (0/0, as the original), else zeros."""
    s = np.asarray(scores, dtype=np.float64)
    span = s.max() - s.min()
    if span == 0 and not compat:
        warnings.warn("all image scores are equal; RsCIN returns zeros (compat=True gives NaN)",
                      RuntimeWarning, stacklevel=3)
        return np.zeros_like(s)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (s - s.min()) / span


def rscin_from_keep(norm_scores: np.ndarray, gram: np.ndarray, keeps: list[np.ndarray]) -> np.ndarray:
    """Mean over windows of (row-normalised W * keep) @ normalised scores. All float64, [N]."""
    out = np.zeros_like(norm_scores)
    for keep in keeps:
        w = np.where(keep, gram, 0.0)
        out += (w @ norm_scores) / w.sum(axis=1)
    return out / len(keeps)


def rscin(scores, cls_tokens, k_list=(1, 2, 3), *, compat: bool = False) -> np.ndarray:
    """Re-scored image scores.

    Args:
        scores: [N] raw image scores (max of each anomaly map).
        cls_tokens: [N, D] image-level tokens in image order (numpy or torch; fp16 keeps the
            original's fp16 Gram).
        k_list: window sizes; a 0 anywhere disables RsCIN (the raw scores come back unchanged).
        compat: constant scores give NaN like the original (default: zeros and a warning).
    Returns:
        [N] float64.
    """
    s = np.asarray(scores.detach().cpu().double() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    if 0 in k_list:
        return s.copy()
    n = len(s)
    if len(cls_tokens) != n:
        raise ValueError(f"RsCIN got {n} scores but {len(cls_tokens)} class tokens")
    ks = []
    for k in k_list:
        if k > n:
            warnings.warn(f"RsCIN window k={k} exceeds N={n}; using k={n}", RuntimeWarning, stacklevel=2)
        ks.append(min(int(k), n))
    gram = cls_gram(cls_tokens)
    return rscin_from_keep(normalise_scores(s, compat), gram, [window_keep_mask(gram, k) for k in ks])
