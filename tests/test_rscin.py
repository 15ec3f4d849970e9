"""RsCIN: golden parity (exact where the original's tie-breaking does not matter), guards, vectorisation."""
from __future__ import annotations

import numpy as np
import pytest

from musc_fast.ops import rscin
from musc_fast.ops.reference import rscin_reference
from musc_fast.ops.rscin import cls_gram, normalise_scores, rscin_from_keep, window_keep_mask

ATOL = 1e-6  # the golden README measured 7.1e-8 on rows without a boundary tie


@pytest.mark.parametrize("cat", ["bottle", "screw"])
def test_gram_is_the_originals_fp16_gram(golden, cat):
    g = golden("golden_rscin")
    np.testing.assert_array_equal(cls_gram(g[f"{cat}_cls"]).astype(np.float16), g[f"{cat}_gram_fp16"])


@pytest.mark.parametrize("cat", ["bottle", "screw"])
@pytest.mark.parametrize("k_list, name", [((1, 2, 3), "k123"), ((1, 8, 9), "k189")])
def test_golden_rscin(golden, cat, k_list, name):
    g = golden("golden_rscin")
    scores, cls = g[f"{cat}_scores"], g[f"{cat}_cls"]
    expected = g[f"{cat}_{name}"]
    tie = np.zeros(len(scores), dtype=bool)
    for k in k_list:
        tie |= g[f"{cat}_tie_k{k}"]
    out = rscin(scores, cls, k_list)
    np.testing.assert_allclose(out[~tie], expected[~tie], rtol=0, atol=ATOL)
    # Tie rows: the original's choice among tied entries is arbitrary; with its keep masks we agree.
    keeps = [g[f"{cat}_keep_k{k}"] for k in k_list]
    np.testing.assert_allclose(rscin_from_keep(normalise_scores(scores), cls_gram(cls), keeps), expected,
                               rtol=0, atol=ATOL)


@pytest.mark.parametrize("cat", ["bottle", "screw"])
@pytest.mark.parametrize("k", [1, 2, 3, 8, 9])
def test_keep_masks_match_off_ties_and_single_windows(golden, cat, k):
    g = golden("golden_rscin")
    gram = cls_gram(g[f"{cat}_cls"])
    keep = window_keep_mask(gram, k)
    assert (keep.sum(1) == k).all()
    tie = g[f"{cat}_tie_k{k}"]
    np.testing.assert_array_equal(keep[~tie], g[f"{cat}_keep_k{k}"][~tie])
    out = rscin(g[f"{cat}_scores"], g[f"{cat}_cls"], (k,))
    np.testing.assert_allclose(out[~tie], g[f"{cat}_k{k}_only"][~tie], atol=ATOL)


def test_k0_passthrough(golden):
    g = golden("golden_rscin")
    out = rscin(g["bottle_scores"], g["bottle_cls"], (0,))
    np.testing.assert_array_equal(out, g["bottle_k0_passthrough"])


def test_constant_scores(golden):
    g = golden("golden_rscin")
    assert np.isnan(rscin(g["const_scores"], g["bottle_cls"], (1, 2, 3), compat=True)).all()
    assert np.isnan(g["const_k123"]).all()
    with pytest.warns(RuntimeWarning, match="equal"):
        out = rscin(g["const_scores"], g["bottle_cls"], (1, 2, 3))
    np.testing.assert_array_equal(out, 0.0)


def test_pipeline_golden_rscin(golden):
    g = golden("golden_pipeline")
    tie = g["rscin_tie"].any(0)
    out = rscin(g["image_scores"], g["cls_tokens"], tuple(g["k_list"]))
    np.testing.assert_allclose(out[~tie], g["rscin_scores"][~tie], atol=ATOL)
    np.testing.assert_allclose(normalise_scores(g["image_scores"]), g["image_scores_norm"], atol=1e-12)


@pytest.mark.parametrize("n, d", [(5, 16), (17, 33), (40, 64)])
def test_vectorised_equals_reference_loop(n, d):
    rng = np.random.default_rng()
    cls = rng.standard_normal((n, d))
    cls /= np.linalg.norm(cls, axis=1, keepdims=True)
    scores = rng.random(n)
    gram = cls_gram(cls)
    ks = [1, 2, 3]
    expected = rscin_reference(scores, gram, [window_keep_mask(gram, k) for k in ks])
    np.testing.assert_allclose(rscin(scores, cls, ks), expected, rtol=0, atol=1e-12)


def test_window_larger_than_n_is_clamped():
    rng = np.random.default_rng()
    cls = rng.standard_normal((3, 8))
    with pytest.warns(RuntimeWarning, match="exceeds"):
        out = rscin(rng.random(3), cls, (1, 8, 9))
    assert np.isfinite(out).all()
