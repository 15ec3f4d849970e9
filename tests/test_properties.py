"""Property-based tests (hypothesis) of the ops against the float64 references in musc_fast/ops/reference.py:
random N, square grids L = G * G, C, r, exact ties and NaN rows. Sizes are tiny; each property runs a
modest number of examples.

Tolerance for mutual scoring. The fast path computes d = sqrt(max(0, 2 - 2 s)) from an fp32 dot product s
of (almost) unit rows, the reference takes exact differences in float64. With u = 2^-24, |error of s| is
at most about C u for unit rows, plus 2 u from their norms, so d^2 is off by at most eps = 2 (C + 2) u
(times a safety factor), and d by at most eps / (d + sqrt(d^2 + eps)): sqrt(eps) ~ 1e-3 for identical
patches, ~1e-5 for distances around 0.1. The interval mean of order statistics moves by at most the
largest move of its inputs, so each output (i, p) gets the bound at its smallest reference distance.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from musc_fast import score_features
from musc_fast.checks import NonFiniteError
from musc_fast.ops import interval_bounds, lnamd, maps_and_image_scores, mutual_scores, rscin
from musc_fast.ops.boxgram import mutual_scores_multi
from musc_fast.ops.lnamd import box_mean, layer_norm_chw
from musc_fast.ops.reference import (
    lnamd_reference,
    mutual_scores_reference,
    nearest_distances_reference,
    rscin_reference,
    upsample_reference,
)
from musc_fast.ops.rscin import cls_gram, window_keep_mask

# PROPS_N=400 runs a deeper search by hand; CI keeps it small.
PROPS = settings(max_examples=int(os.environ.get("PROPS_N", "40")), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])
U = 2.0 ** -24
SAFETY = 8.0


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def msm_tolerance(z: np.ndarray, scale: float = 1.0, kappa: np.ndarray | None = None) -> np.ndarray:
    """[N, L] bound on |fast - reference| for mutual scores of unit rows z [N, L, C] (module docstring).

    ``kappa`` [N, L]: cancellation factors of the features behind z (``box_cancellation``); a similarity
    made from cancelling sums is off by up to kappa_p * kappa_q times more.
    """
    eps = SAFETY * scale * 2 * (z.shape[-1] + 2) * U
    if kappa is not None:
        eps = eps * np.maximum(1.0, kappa * kappa.max())
    a = nearest_distances_reference(z)  # [N, L, N], +inf on the self entries
    d = a.min(axis=-1)
    return 1e-7 + eps / (d + np.sqrt(d * d + eps))


def box_cancellation(x: np.ndarray, r: int) -> np.ndarray:
    """[N, L] kappa = ||box_r |y|(p)|| / ||box_r y(p)|| for y = the float64 LayerNorm of x [N, L, C]: how much
    the r x r box mean cancels. Around 1 for real features; large when the window covers most of a tiny
    grid (the LayerNorm'd map sums to about zero over the whole image), and then the fp32 box mean keeps
    few correct digits."""
    y = torch.from_numpy(x.astype(np.float64))
    y = (y - y.mean(dim=(1, 2), keepdim=True)) / torch.sqrt(y.var(dim=(1, 2), keepdim=True, unbiased=False) + 1e-5)
    v, a = (box_mean(t, r).norm(dim=-1) for t in (y, y.abs()))
    return (a / v.clamp_min(1e-300)).numpy()


@st.composite
def unit_features(draw, min_n=2, max_n=6):
    """Unit rows [N, G*G, C] float32 with optional exact ties (a duplicated image, a constant image, repeated
    vectors) and coarse values (many equal distances)."""
    n = draw(st.integers(min_n, max_n))
    g = draw(st.integers(1, 4))
    c = draw(st.integers(1, 8))
    rng = _rng(draw(st.integers(0, 2**32 - 1)))
    z = rng.standard_normal((1, g * g, c)) + draw(st.sampled_from([0.3, 1.0, 3.0])) * rng.standard_normal((n, g * g, c))
    if draw(st.booleans()):
        z = np.round(z)  # coarse: many exact ties between distances
        z[np.linalg.norm(z, axis=-1) == 0] = 1.0
    if n > 2 and draw(st.booleans()):
        z[-1] = z[0]  # a duplicated image
    if draw(st.booleans()):
        z[1] = z[1, :1]  # one image made of a single repeated vector
    return _unit(z)


# ------------------------------------------------------------------------------------------------
# MSM

@PROPS
@given(unit_features(), st.sampled_from([(0.0, 0.3), (0.0, 0.5), (1, 3), (0.5, 0.1), (0.2, 1.0)]))
def test_mutual_scores_match_the_reference(z, topmin):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = mutual_scores(z, topmin)
        ref = mutual_scores_reference(z, topmin)
    assert out.dtype == np.float64 and out.shape == z.shape[:2] and np.isfinite(out).all()
    assert (np.abs(out - ref) <= msm_tolerance(z)).all(), np.abs(out - ref).max()
    k_min, k_max = interval_bounds(z.shape[0] - 1, topmin)
    assert 0 <= k_min < k_max <= z.shape[0] - 1


@PROPS
@given(unit_features(max_n=4))
def test_compat_small_sets_are_nan_like_the_original(z):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = mutual_scores(z, compat=True)
    ref = mutual_scores_reference(z, compat=True)
    assert np.array_equal(np.isnan(out), np.isnan(ref)) and np.isnan(out).all()  # floor(0.3 (N-1)) = 0


@PROPS
@given(unit_features(min_n=3), st.data())
def test_nan_rows_are_flagged_never_laundered(z, data):
    """A NaN row makes NaN outputs (no crash, no finite garbage); the pipeline refuses it with a clear error."""
    n, length, _ = z.shape
    i, p = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, length - 1))
    z = z.copy()
    z[i, p] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = mutual_scores(z)
    assert out.shape == (n, length) and np.isnan(out[i, p])
    tokens = torch.from_numpy(z)
    with pytest.raises(NonFiniteError) as info:
        score_features([tokens], None, image_size=8, r_list=(1,))
    assert info.value.indices == [i] and f"at positions {i}:" in str(info.value)


# ------------------------------------------------------------------------------------------------
# LNAMD and the one-Gram path

@st.composite
def tokens(draw, min_n=1, max_n=4):
    n = draw(st.integers(min_n, max_n))
    g = draw(st.integers(1, 4))
    c = draw(st.integers(2, 8))
    rng = _rng(draw(st.integers(0, 2**32 - 1)))
    x = (rng.standard_normal((n, g * g, c)) * draw(st.sampled_from([1e-2, 1.0, 1e2]))
         + draw(st.sampled_from([0.0, 5.0]))).astype(np.float32)
    if n > 1 and draw(st.booleans()):
        x[-1] = x[0]  # ties across images
    return x


def lnamd_tolerance(x: np.ndarray, r: int) -> np.ndarray:
    """[N, L, 1] bound for fp32 LNAMD vs float64. Two conditioning effects, both present in the original's
    fp32 code too: x - mean loses |mean| * u of absolute precision, which the LayerNorm divides by
    sqrt(var + eps) (cond = (|mean| + max |x - mean|) / sqrt(var + eps)); and a box mean that cancels
    (kappa, ``box_cancellation``) loses a further factor kappa before the L2 normalisation."""
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(1, 2), keepdims=True)
    var = x64.var(axis=(1, 2), keepdims=True)
    spread = np.abs(x64 - mean).max(axis=(1, 2), keepdims=True)
    cond = (np.abs(mean) + spread) / np.sqrt(var + 1e-5)
    return 2e-5 + 1e-6 * (cond + r * r) * box_cancellation(x, r)[..., None]


def feature_error(x: np.ndarray, r: int) -> float:
    """How far fp32 LNAMD features can move a mutual score: distances are 1-Lipschitz in each row, so
    2 x (largest row error) = 2 sqrt(C) x (the conditioning part of lnamd_tolerance)."""
    return float(2 * np.sqrt(x.shape[-1]) * (lnamd_tolerance(x, r) - 2e-5 + 1e-6).max())


@PROPS
@given(tokens(), st.sampled_from([1, 3, 5, 7]))
def test_lnamd_matches_the_reference(x, r):
    out = lnamd(x, r)
    ref = lnamd_reference(x, r)
    assert out.dtype == np.float32 and out.shape == x.shape
    assert (np.abs(out - ref) <= lnamd_tolerance(x, r)).all(), np.abs(out - ref).max()


@PROPS
@given(tokens(min_n=2), st.data())
def test_lnamd_keeps_a_nan_inside_its_image(x, data):
    """LayerNorm is per image: a NaN token poisons its own image (flagged as NaN) and nothing else."""
    i = data.draw(st.integers(0, x.shape[0] - 1))
    x = x.copy()
    x[i, data.draw(st.integers(0, x.shape[1] - 1)), 0] = np.nan
    out = lnamd(x, 3)
    assert np.isnan(out[i]).all()
    others = [j for j in range(x.shape[0]) if j != i]
    assert (np.abs(out[others] - lnamd_reference(x[others], 3)) <= lnamd_tolerance(x[others], 3)).all()


@PROPS
@given(tokens(min_n=2, max_n=5), st.lists(st.sampled_from([1, 3, 5]), min_size=1, max_size=3, unique=True))
def test_one_gram_path_matches_lnamd_then_msm_reference(x, r_list):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = mutual_scores_multi(layer_norm_chw(torch.from_numpy(x)), r_list).numpy()
    for k, r in enumerate(r_list):
        z = lnamd_reference(x, r)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = mutual_scores_reference(z)
        tol = msm_tolerance(z, scale=r ** 2, kappa=box_cancellation(x, r)) + feature_error(x, r)
        assert (np.abs(out[k] - ref) <= tol).all(), (r, np.abs(out[k] - ref).max())


# ------------------------------------------------------------------------------------------------
# maps, RsCIN, and the whole of score_features

@PROPS
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 16), st.integers(0, 2**32 - 1))
def test_maps_and_image_scores_match_the_reference(n, g, extra, seed):
    size = g + extra
    patch = _rng(seed).standard_normal((n, g, g))
    maps, scores = maps_and_image_scores(torch.from_numpy(patch), size, chunk=2)
    ref = upsample_reference(patch, size)
    np.testing.assert_allclose(maps.numpy(), ref, rtol=1e-6, atol=1e-6)  # maps are stored as float32
    np.testing.assert_allclose(scores.numpy(), ref.max(axis=(1, 2)), rtol=0, atol=1e-12)


@PROPS
@given(st.integers(2, 8), st.integers(1, 6), st.integers(0, 2**32 - 1), st.booleans(), st.data())
def test_rscin_matches_the_reference(n, d, seed, ties, data):
    rng = _rng(seed)
    cls = np.abs(rng.standard_normal((n, d))) + 1e-3  # positive similarities, like CLIP's
    if ties:
        cls[-1] = cls[0]
    cls = cls / np.linalg.norm(cls, axis=1, keepdims=True)
    scores = rng.random(n)
    assume(scores.max() > scores.min())
    ks = data.draw(st.lists(st.integers(1, n), min_size=1, max_size=3))
    out = rscin(scores, cls, ks)
    gram = cls_gram(cls)
    ref = rscin_reference(scores, gram, [window_keep_mask(gram, k) for k in ks])
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)
    assert np.isfinite(out).all() and (out >= -1e-12).all() and (out <= 1 + 1e-12).all()


def test_rscin_constant_scores_are_zeros_or_flagged_nan():
    cls = np.eye(4)
    with pytest.warns(RuntimeWarning, match="all image scores are equal"):
        assert (rscin(np.full(4, 0.3), cls, (1, 2)) == 0).all()
    assert np.isnan(rscin(np.full(4, 0.3), cls, (1, 2), compat=True)).all()


@settings(max_examples=max(1, PROPS.max_examples * 3 // 5), deadline=None)
@given(tokens(min_n=2, max_n=5), st.lists(st.sampled_from([1, 3, 5]), min_size=1, max_size=2, unique=True),
       st.booleans())
def test_score_features_matches_the_composed_reference(x, r_list, one_gram):
    """The whole pipeline after the backbone = mean over layers and r of the reference MSM, upsampled."""
    n, length, c = x.shape
    g = int(round(length ** 0.5))
    layers = [torch.from_numpy(x), torch.from_numpy(x[..., ::-1].copy() * 0.5 + 1)]
    import os

    old = os.environ.get("MUSC_FAST_BOXGRAM")
    os.environ["MUSC_FAST_BOXGRAM"] = "1" if one_gram else "0"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = score_features(layers, None, image_size=2 * g + 1, r_list=r_list)
    finally:
        if old is None:
            del os.environ["MUSC_FAST_BOXGRAM"]
        else:
            os.environ["MUSC_FAST_BOXGRAM"] = old
    ref = np.zeros((n, length))
    tol = np.zeros((n, length))
    for t in layers:
        for r in r_list:
            z = lnamd_reference(t.numpy(), r)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref += mutual_scores_reference(z)
            kappa = box_cancellation(t.numpy(), r)
            tol = np.maximum(tol, msm_tolerance(z, scale=r ** 2, kappa=kappa) + feature_error(t.numpy(), r))
    ref /= len(layers) * len(r_list)
    assert np.isfinite(res.patch_scores).all()
    assert (np.abs(res.patch_scores.reshape(n, length) - ref) <= tol).all()
    maps = upsample_reference(res.patch_scores, 2 * g + 1)
    np.testing.assert_allclose(res.raw_image_scores, maps.max(axis=(1, 2)), rtol=0, atol=1e-12)
