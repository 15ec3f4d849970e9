"""musc_fast.metrics vs the original's outputs (golden), sklearn, skimage-based slow loops, hand cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage import measure
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from bench.bench_metrics import baseline_metrics, synthetic
from musc_fast.metrics import (
    IMAGE_METRICS,
    METRIC_NAMES,
    PIXEL_METRICS,
    aupro_mvtec,
    compute_metrics,
    curve_metrics,
    format_table,
    pro_musc,
)

TOL = 1e-9  # the golden README measured <= 2e-18 between sklearn versions


def _ordered(m: dict) -> tuple[list, list]:
    """Our dict -> the original's output order: image [AUROC, F1, AP], pixel [AUROC, F1, AP, PRO]."""
    return [m["auroc_sp"], m["f1_sp"], m["ap_sp"]], [m["auroc_px"], m["f1_px"], m["ap_px"], m["aupro"]]


def _golden_case(g, case: str):
    """(gt_sp, pr_sp, gt_px, pr_px) of golden_metrics case a/b/c (d needs golden_pipeline)."""
    if case == "c":
        rows = g["c_rows_of_a"]
        return g["a_gt_sp"][rows], g["a_pr_sp"][rows], g["a_gt_px"][rows], g["a_pr_px"][rows]
    return g[f"{case}_gt_sp"], g[f"{case}_pr_sp"], g[f"{case}_gt_px"], g[f"{case}_pr_px"]


def _case_d(golden):
    p = golden("golden_pipeline")
    g = golden("golden_metrics")
    pr_px = p["anomaly_maps"].astype(np.float64)[:, None]
    return p["labels"], p["rscin_scores"], g["d_gt_px"].astype(np.int32), pr_px


# ------------------------------------------------------------------ golden parity
@pytest.mark.parametrize("case,compat", [("a", False), ("a", True), ("b", True), ("c", True), ("d", False)])
def test_golden_metrics(golden, case, compat):
    g = golden("golden_metrics")
    inputs = _case_d(golden) if case == "d" else _golden_case(g, case)
    image, pixel = _ordered(compute_metrics(*inputs, compat=compat))
    np.testing.assert_allclose(image, g[f"{case}_image_metric"], rtol=0, atol=TOL)
    np.testing.assert_allclose(pixel, g[f"{case}_pixel_metric"], rtol=0, atol=TOL)


@pytest.mark.parametrize("case", ["a", "c", "d"])
def test_golden_pro_curve(golden, case):
    """The (normalised FPR, PRO) points MuSc integrated, point for point, and its threshold count."""
    g = golden("golden_metrics")
    _, _, gt_px, pr_px = _case_d(golden) if case == "d" else _golden_case(g, case)
    au, x, y = pro_musc(gt_px, pr_px, return_curve=True)
    assert x.shape == g[f"{case}_pro_curve_fpr_norm"].shape
    np.testing.assert_allclose(x, g[f"{case}_pro_curve_fpr_norm"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(y, g[f"{case}_pro_curve_pro"], rtol=0, atol=1e-12)
    assert au == pytest.approx(g[f"{case}_pixel_metric"][3], abs=TOL)
    lo, hi = pr_px.min(), pr_px.max()
    assert np.arange(lo, hi, (hi - lo) / 200).size == g[f"{case}_pro_n_thresholds"]


def test_golden_guards_default_are_nan(golden):
    """Case b (no anomaly at all) and c (all images anomalous): NaN by default where compat gives 0."""
    g = golden("golden_metrics")
    b = compute_metrics(*_golden_case(g, "b"))
    assert all(math.isnan(b[k]) for k in METRIC_NAMES)
    c = compute_metrics(*_golden_case(g, "c"))
    assert all(math.isnan(c[k]) for k in IMAGE_METRICS)
    np.testing.assert_allclose(_ordered(c)[1], g["c_pixel_metric"], rtol=0, atol=TOL)


@pytest.mark.parametrize("key,scores", [("image_metrics_rscin", "rscin_scores"),
                                        ("image_metrics_raw", "image_scores")])
def test_golden_pipeline_image_metrics(golden, key, scores):
    p = golden("golden_pipeline")
    np.testing.assert_allclose(curve_metrics(p["labels"], p[scores]), p[key], rtol=0, atol=TOL)


# ------------------------------------------------------------------ sklearn cross-checks
def _sklearn_curve(labels, scores):
    p, r, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * p * r / (p + r)
    return roc_auc_score(labels, scores), np.max(f1[np.isfinite(f1)]), average_precision_score(labels, scores)


@pytest.mark.parametrize("levels", [2, 5, 50, None], ids=lambda v: f"levels{v}")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_curve_metrics_vs_sklearn(seed, dtype, levels):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 5000))
    labels = (rng.random(n) < rng.uniform(0.02, 0.6)).astype(np.int64)
    labels[:2] = [0, 1]
    scores = rng.normal(size=n) + 0.7 * labels
    if levels is not None:  # heavy ties, also across classes
        scores = np.floor(scores * levels / 3) / levels
    scores = scores.astype(dtype)
    np.testing.assert_allclose(curve_metrics(labels, scores), _sklearn_curve(labels, scores),
                               rtol=0, atol=1e-12)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 6)), min_size=2, max_size=40))
def test_curve_metrics_vs_sklearn_tiny(pairs):
    labels = np.array([p[0] for p in pairs], dtype=np.int64)
    scores = np.array([p[1] for p in pairs], dtype=np.float64) / 3
    got = curve_metrics(labels, scores)
    if labels.min() == labels.max():
        assert all(math.isnan(v) for v in got)
    else:
        np.testing.assert_allclose(got, _sklearn_curve(labels, scores), rtol=0, atol=1e-12)


def test_pixel_curves_vs_sklearn_float32_maps():
    rng = np.random.default_rng(5)
    masks = rng.random((3, 20, 24)) < 0.1
    maps = (np.round(rng.random((3, 20, 24)) * 30) / 30 + 0.3 * masks).astype(np.float32)
    m = compute_metrics([0, 1, 1], [0.1, 0.2, 0.3], masks, maps)
    want = _sklearn_curve(masks.ravel().astype(int), maps.ravel())
    np.testing.assert_allclose([m["auroc_px"], m["f1_px"], m["ap_px"]], want, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ PRO vs straightforward loops
@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("seed", [0, 3])
def test_all_metrics_vs_baseline(seed, ties):
    """Every metric vs bench's straightforward SPEC 6 implementation (skimage relabelled per threshold)."""
    labels, scores, masks, maps = synthetic(6, 40, ties=ties, seed=seed)
    ours, ref = compute_metrics(labels, scores, masks, maps), baseline_metrics(labels, scores, masks, maps)
    for k in METRIC_NAMES:
        assert ours[k] == pytest.approx(ref[k], abs=1e-12, nan_ok=True), k


def test_pro_musc_float32_maps_vs_baseline():
    """Float32 maps: thresholds come out float64 (as np.arange gives them) and compare in float64."""
    _, _, masks, maps = synthetic(4, 32, ties=False, seed=7)
    maps = maps.astype(np.float32)
    ref = baseline_metrics([0, 1, 0, 1], [0, 1, 0, 1], masks, maps)
    assert pro_musc(masks, maps) == pytest.approx(ref["aupro"], abs=1e-12)


def test_pro_musc_scores_exactly_on_thresholds():
    """Dyadic maps with min 0 and max 200/256: thresholds are exactly k/256 and so are many pixels."""
    rng = np.random.default_rng(11)
    _, _, masks, _ = synthetic(3, 32, seed=11)
    k = np.where(masks, rng.integers(0, 201, masks.shape), rng.integers(0, 120, masks.shape) ** 2 // 120)
    k.flat[:2] = [0, 200]
    maps = k / 256.0
    assert np.isin(maps, np.arange(0.0, 200 / 256, 1 / 256)).mean() > 0.9
    ref = baseline_metrics([0, 1, 1], [0, 1, 1], masks, maps)
    assert pro_musc(masks, maps) == pytest.approx(ref["aupro"], abs=1e-12)


def _slow_aupro_mvtec(masks, maps, limit=0.3):
    """Per-threshold loop over every distinct score with skimage labels, clipped-segment integration."""
    masks = np.asarray(masks) != 0
    regions = [r.coords for m in masks for r in measure.regionprops(measure.label(m, connectivity=2))]
    owner = [i for i, m in enumerate(masks) for _ in measure.regionprops(measure.label(m, connectivity=2))]
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        hit = maps >= t
        xs.append(np.count_nonzero(hit & ~masks) / np.count_nonzero(~masks))
        ys.append(np.mean([hit[i][c[:, 0], c[:, 1]].mean() for i, c in zip(owner, regions, strict=True)]))
    xs.append(1.0)
    ys.append(1.0)
    area = 0.0
    for i in range(len(xs) - 1):
        x0, y0, x1, y1 = xs[i], ys[i], xs[i + 1], ys[i + 1]
        if x0 >= limit or x1 == x0:
            continue
        xe = min(x1, limit)
        area += (xe - x0) * (y0 + (y0 + (y1 - y0) * (xe - x0) / (x1 - x0))) / 2
    return area / limit


def test_aupro_mvtec_hand_case():
    """Region A = 2 px (scores .8, .4), region B = 1 px (.6), negatives .9 .6 .3 .2 .1 (one tie with B).

    Curve: (0,0) (.2,0) (.2,.25) (.4,.75) (.4,1) ... (1,1). Area to .3 = .1*(.25+.5)/2 = .0375 -> .125;
    to .4 (a corner, no interpolation) = .1 -> .25; to 1 = .1 + .6 = .7.
    """
    masks = np.array([[[1, 0, 0, 1], [1, 0, 0, 0]]])
    maps = np.array([[[0.8, 0.9, 0.6, 0.6], [0.4, 0.3, 0.2, 0.1]]])
    assert aupro_mvtec(masks, maps) == pytest.approx(0.125, abs=1e-15)
    assert aupro_mvtec(masks, maps, fpr_limit=0.4) == pytest.approx(0.25, abs=1e-15)
    assert aupro_mvtec(masks, maps, fpr_limit=1.0) == pytest.approx(0.7, abs=1e-15)
    _, x, y = aupro_mvtec(masks, maps, return_curve=True)
    # corners: a flat run then a step per distinct positive score (.8, .6, .4), then (1, 1)
    np.testing.assert_allclose(x, [0, 0.2, 0.2, 0.2, 0.4, 0.4, 0.4, 1], atol=1e-15)
    np.testing.assert_allclose(y, [0, 0, 0.25, 0.25, 0.75, 0.75, 1, 1], atol=1e-15)


def test_aupro_mvtec_diagonal_neighbours_are_one_region():
    """(1,1)(1,2) plus (2,3) touching diagonally: one 3-px region (PRO 1/3 once (2,3) is hit);
    4-connectivity would give regions of 2 and 1 px and PRO 1/2."""
    masks = np.zeros((1, 4, 5), bool)
    masks[0, 1, 1] = masks[0, 1, 2] = masks[0, 2, 3] = True
    maps = np.zeros((1, 4, 5))
    maps[0, 2, 3], maps[0, 0, 0] = 0.9, 0.5
    _, _, y = aupro_mvtec(masks, maps, return_curve=True)
    np.testing.assert_allclose(np.unique(y), [0.0, 1 / 3, 1.0], atol=1e-15)
    assert aupro_mvtec(masks, maps) == pytest.approx(_slow_aupro_mvtec(masks, maps), abs=1e-12)


@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_mvtec_vs_slow(seed, limit):
    rng = np.random.default_rng(seed)
    _, _, masks, maps = synthetic(3, 24, ties=True, seed=seed)
    maps = np.round(maps * 16) / 16 + 0.02 * rng.integers(0, 2, maps.shape)  # few levels, pos/neg ties
    assert aupro_mvtec(masks, maps, fpr_limit=limit) == pytest.approx(
        _slow_aupro_mvtec(masks, maps, limit), abs=1e-12)


# ------------------------------------------------------------------ edge cases and API
def test_masks_none_gives_none_pixel_metrics():
    m = compute_metrics([0, 1, 1], [0.2, 0.9, 0.4], None, None)
    assert list(m) == list(METRIC_NAMES)
    assert all(m[k] is None for k in PIXEL_METRICS)
    assert m["auroc_sp"] == 1.0 and isinstance(m["ap_sp"], float)


def test_single_label_images_nan_or_zero():
    maps = np.random.default_rng(0).random((3, 8, 8))
    masks = maps > 0.9
    for labels in ([0, 0, 0], [1, 1, 1]):
        default = compute_metrics(labels, [0.1, 0.2, 0.3], masks, maps)
        compat = compute_metrics(labels, [0.1, 0.2, 0.3], masks, maps, compat=True)
        assert all(math.isnan(default[k]) for k in IMAGE_METRICS)
        assert all(compat[k] == 0.0 for k in IMAGE_METRICS)
        assert default["auroc_px"] == compat["auroc_px"] > 0.5


def test_all_pixels_anomalous_is_nan_in_both_modes():
    maps = np.random.default_rng(1).random((2, 6, 6))
    for compat in (False, True):
        m = compute_metrics([0, 1], [0.1, 0.9], np.ones((2, 6, 6), int), maps, compat=compat)
        assert all(math.isnan(m[k]) for k in PIXEL_METRICS)


def test_non_finite_scores_give_nan():
    maps = np.random.default_rng(2).random((2, 6, 6))
    masks = maps > 0.8
    m = compute_metrics([0, 1], [0.5, np.nan], masks, np.where(masks, np.nan, maps))
    assert all(math.isnan(m[k]) for k in METRIC_NAMES)
    # compat: a labels-only guard wins over NaN scores, as in the original
    m = compute_metrics([1, 1], [0.5, np.nan], np.zeros((2, 6, 6)), maps * np.nan, compat=True)
    assert all(m[k] == 0.0 for k in METRIC_NAMES)


def test_constant_map_and_too_few_thresholds():
    masks = np.zeros((2, 5, 5), bool)
    masks[1, 2, 2] = True
    assert math.isnan(pro_musc(masks, np.ones((2, 5, 5))))
    # Thresholds 0, .01, ..., 1.99: 48 of 49 negatives sit at `level`, so FPR = 48/49 until th passes it.
    for level, n_kept in ((1.985, 1), (1.995, 0)):
        maps = np.full((2, 5, 5), level)
        maps[0, 0, 0], maps[1, 2, 2] = 0.0, 2.0
        ths = np.arange(0.0, 2.0, 0.01)
        assert np.count_nonzero((maps[masks == 0] > ths[:, None]).mean(1) < 0.3) == n_kept
        assert math.isnan(pro_musc(masks, maps))
        assert aupro_mvtec(masks, maps) == pytest.approx(1.0, abs=1e-15)


def test_input_forms_agree():
    labels, scores, masks, maps = synthetic(4, 16, seed=2)
    a = compute_metrics(labels, scores, masks, maps)
    b = compute_metrics(list(labels), scores.tolist(), masks[:, None].astype(np.int32) * 1, maps[:, None])
    c = compute_metrics(labels, scores, masks.astype(np.uint8) * 255, maps)  # nonzero = anomalous
    np.testing.assert_equal([list(b.values()), list(c.values())], [list(a.values())] * 2)


def test_shape_and_argument_errors():
    with pytest.raises(ValueError):
        compute_metrics([0, 1], [0.1, 0.2], np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError):
        compute_metrics([0, 1], [0.1, 0.2], np.zeros((2, 4, 4)), None)
    with pytest.raises(ValueError):
        curve_metrics([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError):
        aupro_mvtec(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), fpr_limit=0.0)


def test_format_table():
    rows = {"bottle": {k: 0.5 for k in METRIC_NAMES}, "cable": {**{k: 1.0 for k in METRIC_NAMES},
                                                                "auroc_sp": math.nan, "aupro": None}}
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["category", *METRIC_NAMES]
    assert lines[2].split()[1:3] == ["-", "100.00"]
    mean = lines[3].split()
    assert mean[0] == "mean" and mean[1] == "50.00" and mean[2] == "75.00" and mean[7] == "50.00"
