"""Image- and pixel-level anomaly metrics of MuSc (SPEC 6), exact and fast, numpy + scipy only.

What is computed (all values are floats in [0, 1], not x100):

* ``auroc``, ``ap``, ``f1`` (image ``*_sp`` and pixel ``*_px``): the values of sklearn's ``roc_auc_score``,
  ``average_precision_score`` and the max over the finite ``2PR/(P+R)`` of ``precision_recall_curve``.
  Instead of three stable argsorts of all N*H*W pixels, the negative scores are sorted once (values only)
  and the few positive scores once; every distinct score is one threshold, as in sklearn. AP and F1-max
  only change at thresholds equal to a positive score, so the curve is evaluated there with two
  ``searchsorted`` calls; AUROC is the Mann-Whitney count (ties count 1/2) summed exactly in int64,
  which equals sklearn's trapezoid up to rounding (~1e-16).
* ``aupro``: MuSc's own (cflow-style) PRO: 200 uniform thresholds ``arange(min, max, (max-min)/200)``,
  ``amap > th``, 8-connected GT regions, FPR < 0.3 kept and min-max normalised, trapezoid area as
  ``sklearn.metrics.auc`` gives it. Regions are labelled once per mask; per-region TP counts for all
  thresholds come from one histogram of (region, threshold bin); FP counts from the sorted negatives.
* ``aupro_mvtec``: the official MVTec AD AU-PRO: the PRO-vs-FPR curve over every distinct score
  (``score >= t``), from (0, 0) to (1, 1), integrated up to FPR = 0.3 with linear interpolation there,
  divided by 0.3. The official script rounds FPRs to float32; we keep float64 (differences ~1e-8).

Undefined cases. ``compat=False`` (default) reports a metric that the labels cannot define as
``float('nan')``: image metrics when all images have one label, pixel metrics when no pixel (or every
pixel) is anomalous, any metric whose scores contain NaN/inf, PRO when fewer than two thresholds keep
FPR < 0.3 or the map is constant. ``compat=True`` reproduces the original's guards (golden README quirk
8): image metrics 0 for a single-label category, all pixel metrics 0 when no pixel is anomalous
(cases where the original crashes still give NaN). ``masks=None`` means no pixel labels: the pixel keys
are present with value ``None``.

Masks are binarised as ``mask != 0`` and image labels as ``label != 0`` (the original's inputs are 0/1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

IMAGE_METRICS = ("auroc_sp", "f1_sp", "ap_sp")
PIXEL_METRICS = ("auroc_px", "f1_px", "ap_px", "aupro", "aupro_mvtec")
METRIC_NAMES = IMAGE_METRICS + PIXEL_METRICS
PRO_STEPS = 200  # MuSc's max_step
PRO_FPR_LIMIT = 0.3  # MuSc's expect_fpr and MVTec's integration limit

# 8-connectivity inside each image, none across images of a stack.
_STRUCTURE_8 = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class _Ranks:
    """Where each distinct positive score sits among the sorted negatives (all [u] int64 but vals).

    vals: distinct positive scores, ascending; starts: index of each one's first copy in the sorted
    positives (so #pos >= v is n_pos - starts); neg_lt / neg_le: #neg < v and #neg <= v.
    """

    n_neg: int
    n_pos: int
    vals: np.ndarray
    starts: np.ndarray
    neg_lt: np.ndarray
    neg_le: np.ndarray


def _ranks(neg: np.ndarray, pos: np.ndarray) -> _Ranks:
    """Ascending negative [n_neg] and positive [n_pos] scores -> _Ranks (two searchsorted calls)."""
    if pos.size:
        starts = np.flatnonzero(np.concatenate(([True], pos[1:] != pos[:-1])))
    else:
        starts = np.zeros(0, np.int64)
    vals = pos[starts]
    return _Ranks(neg.size, pos.size, vals, starts,
                  np.searchsorted(neg, vals, side="left"), np.searchsorted(neg, vals, side="right"))


@dataclass(frozen=True)
class _Pixels:
    """Pixel scores split by label, ready for every pixel metric.

    neg: [n_neg] scores of negative pixels, ascending.
    pos: [n_pos] scores of positive pixels, ascending; ranks: their _Ranks among ``neg``.
    region: [n_pos] int64 GT-region id (0..n_regions-1) of each entry of ``pos``.
    areas: [n_regions] int64 pixel count of each region.
    lo, hi: min and max over all pixels, in the maps' dtype (PRO thresholds are built from them).
    """

    neg: np.ndarray
    pos: np.ndarray
    ranks: _Ranks
    region: np.ndarray
    areas: np.ndarray
    lo: np.generic
    hi: np.generic


def _prepare_pixels(masks, maps) -> _Pixels:
    """masks [N,H,W] (or [N,1,H,W]) bool/int, maps same shape float -> _Pixels (one sort of the negatives)."""
    masks, maps = _as_stack(masks), _as_stack(maps)
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float64)
    positive = masks != 0
    ids, offset = [], 0
    for m in positive:  # label each mask once; ids in raster order, image after image
        lab, n = ndimage.label(m, structure=_STRUCTURE_8)
        ids.append(lab[m].astype(np.int64) + (offset - 1))
        offset += n
    region = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    neg = np.sort(maps[~positive])  # values only: ties make stability irrelevant
    pos_unsorted = maps[positive]  # same C order as ``region``
    order = np.argsort(pos_unsorted, kind="stable")
    pos = pos_unsorted[order]
    return _Pixels(neg=neg, pos=pos, ranks=_ranks(neg, pos), region=region[order],
                   areas=np.bincount(region, minlength=offset).astype(np.int64),
                   lo=maps.min() if maps.size else np.float64(np.nan),
                   hi=maps.max() if maps.size else np.float64(np.nan))


def _as_stack(a) -> np.ndarray:
    """[N,H,W] or [N,1,H,W] array-like -> [N,H,W] ndarray (the original passes gt_px with a channel axis)."""
    a = np.asarray(a)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"expected [N,H,W] or [N,1,H,W], got shape {a.shape}")
    return a


def _curve(rk: _Ranks) -> tuple[float, float, float]:
    """_Ranks -> (AUROC, F1-max, AP) as sklearn computes them; NaN if a class is empty."""
    n_neg, n_pos = rk.n_neg, rk.n_pos
    if n_neg == 0 or n_pos == 0:
        return math.nan, math.nan, math.nan
    count = np.diff(np.append(rk.starts, n_pos))  # positives equal to each value
    # AUROC = P(pos > neg) + P(pos == neg)/2; doubled so that the sum stays an exact integer.
    twice_u = int(np.sum(count * (2 * rk.neg_lt + (rk.neg_le - rk.neg_lt)), dtype=np.int64))
    auroc = twice_u / (2 * n_pos * n_neg)
    # AP and F1 change only at positive scores. Walk them downward as sklearn walks its thresholds:
    # TP = #pos >= v, FP = #neg >= v.
    tp = (n_pos - rk.starts)[::-1].astype(np.float64)
    fp = (n_neg - rk.neg_lt)[::-1].astype(np.float64)
    precision = tp / (tp + fp)
    recall = tp / n_pos
    ap = float(np.sum(np.diff(recall, prepend=0.0) * precision))
    f1 = 2 * precision * recall / (precision + recall)
    return float(auroc), float(np.max(f1)), ap


def curve_metrics(labels, scores) -> tuple[float, float, float]:
    """labels [n] int/bool (nonzero = anomalous), scores [n] float -> (AUROC, F1-max, AP).

    Same values as sklearn's roc_auc_score / max finite F1 of precision_recall_curve /
    average_precision_score. NaN when one class is empty or a score is not finite.
    """
    labels, scores = np.asarray(labels).ravel() != 0, np.asarray(scores).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in shape")
    if not np.all(np.isfinite(scores)):
        return math.nan, math.nan, math.nan
    return _curve(_ranks(np.sort(scores[~labels]), np.sort(scores[labels])))


def _pro_musc(px: _Pixels, steps: int, fpr_limit: float):
    """MuSc's PRO. Returns (aupro, fpr_norm [k], pro [k]) for the kept thresholds (ascending thresholds)."""
    n_regions, n_neg = px.areas.size, px.neg.size
    if n_regions == 0 or n_neg == 0 or not px.hi > px.lo:
        return math.nan, None, None
    ths = np.arange(px.lo, px.hi, (px.hi - px.lo) / steps)  # as the original: ~steps values, maps' min..max
    n_th = ths.size
    fpr = (n_neg - np.searchsorted(px.neg, ths, side="right")) / n_neg  # #neg > th / #neg
    # A positive pixel with k thresholds below its score is a TP for ths[:k].
    k = np.searchsorted(ths, px.pos, side="left")
    key, cnt = np.unique(px.region * (n_th + 1) + k, return_counts=True)
    hist = np.bincount(key % (n_th + 1), weights=cnt / px.areas[key // (n_th + 1)], minlength=n_th + 1)
    pro = np.cumsum(hist[::-1])[::-1][1:] / n_regions  # mean over regions of TP(th)/area
    keep = fpr < fpr_limit
    if np.count_nonzero(keep) < 2:
        return math.nan, None, None
    fpr, pro = fpr[keep], pro[keep]
    span = fpr.max() - fpr.min()
    if span == 0:
        return math.nan, None, None
    x = (fpr - fpr.min()) / span
    # sklearn.metrics.auc: x falls as the threshold rises, so the trapezoid is negated.
    return float(-np.trapezoid(pro, x)), x, pro


def _aupro_mvtec(px: _Pixels, fpr_limit: float):
    """Official MVTec AU-PRO. Returns (au_pro, fpr [m], pro [m]) with the piecewise-linear curve's corners."""
    n_regions, n_neg = px.areas.size, px.neg.size
    if n_regions == 0 or n_neg == 0:
        return math.nan, None, None
    rk = px.ranks
    # PRO(v) = mean over regions of the fraction of its pixels with score >= v.
    weight = 1.0 / px.areas[px.region]
    pro_ge = np.cumsum(weight[::-1])[::-1][rk.starts] / n_regions
    neg_gt, neg_ge = n_neg - rk.neg_le, n_neg - rk.neg_lt
    # Walk distinct positive values downward: a flat run over the negatives strictly above v at the
    # previous PRO, then one (possibly diagonal) step through the scores equal to v.
    pro_desc, prev = pro_ge[::-1], np.concatenate(([0.0], pro_ge[::-1][:-1]))
    x = np.concatenate(([0.0], np.stack([neg_gt[::-1], neg_ge[::-1]], 1).ravel() / n_neg, [1.0]))
    y = np.concatenate(([0.0], np.stack([prev, pro_desc], 1).ravel(), [1.0]))
    return _trapezoid_upto(x, y, fpr_limit) / fpr_limit, x, y


def _trapezoid_upto(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under the polyline (x ascending, repeats allowed) from x[0] to x_max (<= x[-1])."""
    ins = int(np.searchsorted(x, x_max, side="right"))  # x[ins-1] <= x_max < x[ins]
    area = float(np.sum(0.5 * (y[1:ins] + y[: ins - 1]) * np.diff(x[:ins])))
    if x[ins - 1] < x_max:  # close the last piece by linear interpolation at x_max
        y_max = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        area += float(0.5 * (y_max + y[ins - 1]) * (x_max - x[ins - 1]))
    return area


def pro_musc(masks, maps, *, steps: int = PRO_STEPS, fpr_limit: float = PRO_FPR_LIMIT,
             return_curve: bool = False):
    """MuSc's PRO (SPEC 6). masks [N,H,W] bool/int, maps [N,H,W] float -> float (NaN if undefined).

    With ``return_curve`` also the (normalised FPR, PRO) points that were integrated, each [k] float64.
    """
    au, x, y = _pro_musc(_prepare_pixels(masks, maps), steps, fpr_limit)
    return (au, x, y) if return_curve else au


def aupro_mvtec(masks, maps, *, fpr_limit: float = PRO_FPR_LIMIT, return_curve: bool = False):
    """Official MVTec AD AU-PRO up to ``fpr_limit`` (in (0, 1]), normalised by it. Same shapes as pro_musc.

    With ``return_curve`` also the corners (FPR, PRO) of the exact curve, each [m] float64, FPR ascending.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit}")
    au, x, y = _aupro_mvtec(_prepare_pixels(masks, maps), fpr_limit)
    return (au, x, y) if return_curve else au


def compute_metrics(image_labels, image_scores, masks, maps, *, compat: bool = False) -> dict:
    """All MuSc metrics of one category.

    image_labels [N] int (nonzero = anomalous), image_scores [N] float, masks [N,H,W] bool/int or None,
    maps [N,H,W] float (a channel axis [N,1,H,W] is accepted too). Returns ``{name: float}`` for every
    name in ``METRIC_NAMES``; values in [0, 1]; NaN (default) or 0 (``compat``) where undefined, see the
    module docstring; pixel values are ``None`` when ``masks`` is None.
    """
    labels = np.asarray(image_labels).ravel() != 0
    out = dict(zip(IMAGE_METRICS, curve_metrics(labels, image_scores), strict=True))
    if compat and (labels.all() or not labels.any()):
        out.update(dict.fromkeys(IMAGE_METRICS, 0.0))
    if masks is None:
        out.update(dict.fromkeys(PIXEL_METRICS, None))
        return out
    if maps is None:
        raise ValueError("masks were given without maps")
    px = _prepare_pixels(masks, maps)
    if compat and px.pos.size == 0:  # the original's guard comes before any use of the maps
        out.update(dict.fromkeys(PIXEL_METRICS, 0.0))
    elif not (np.isfinite(px.lo) and np.isfinite(px.hi)):
        out.update(dict.fromkeys(PIXEL_METRICS, math.nan))
    else:
        out.update(zip(("auroc_px", "f1_px", "ap_px"), _curve(px.ranks), strict=True))
        out["aupro"] = _pro_musc(px, PRO_STEPS, PRO_FPR_LIMIT)[0]
        out["aupro_mvtec"] = _aupro_mvtec(px, PRO_FPR_LIMIT)[0]
    return out


def format_table(rows: dict, *, names=METRIC_NAMES, scale: float = 100.0, digits: int = 2) -> str:
    """{category: {metric: value}} -> text table (values x scale) with a final unweighted "mean" row.

    NaN and None print as "-" and are left out of the mean (the original's 0s would be averaged in).
    """
    width = max([len("category"), len("mean"), *map(len, rows)])
    lines = ["  ".join([f"{'category':<{width}}", *(f"{n:>11}" for n in names)])]

    def cell(v):
        return f"{'-':>11}" if v is None or v != v else f"{v * scale:>11.{digits}f}"

    for cat, vals in rows.items():
        lines.append("  ".join([f"{cat:<{width}}", *(cell(vals.get(n)) for n in names)]))
    means = []
    for n in names:
        col = [v[n] for v in rows.values() if v.get(n) is not None and v[n] == v[n]]
        means.append(float(np.mean(col)) if col else None)
    lines.append("  ".join([f"{'mean':<{width}}", *map(cell, means)]))
    return "\n".join(lines)
