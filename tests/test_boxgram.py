"""One Gram per layer for every r: equal to the per-r LNAMD + MSM path, and to the float64 reference."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from musc_fast.ops import SmallBatchWarning
from musc_fast.ops.boxgram import (
    MIN_CHANNELS_CPU,
    box_filter_gram,
    gram_backend_ok,
    mutual_scores_multi,
    use_boxgram,
)
from musc_fast.ops.lnamd import box_mean, layer_norm_chw, lnamd_torch
from musc_fast.ops.msm import mutual_scores_torch
from musc_fast.ops.reference import lnamd_reference, mutual_scores_reference

ATOL_FP32 = 1e-5  # both paths are fp32; they differ only in summation order
ATOL_TIES = 1e-3  # identical vectors: distance is sqrt of fp32 rounding residue (see test_msm)


def _tokens(n: int, g: int, c: int, rng: np.random.Generator, duplicates: bool = False) -> torch.Tensor:
    # Aligned structure (shared prototype per grid position) + per-channel offsets, like real tokens.
    # (Offsets much larger than the content push every similarity towards 1; distances then get tiny and
    # both fp32 paths drift ~1e-5 from float64 through sqrt(2 - 2s) cancellation, equally.)
    x = 2.0 * rng.standard_normal((1, g * g, c)) + rng.standard_normal((n, g * g, c)) + rng.normal(0, 1, c)
    if duplicates:
        x[-1] = x[0]
    return torch.from_numpy(x.astype(np.float32))


def _per_r(tokens: torch.Tensor, r_list) -> torch.Tensor:
    return torch.stack([mutual_scores_torch(lnamd_torch(tokens, r)) for r in r_list])


@pytest.mark.parametrize("r_list", [(1, 3, 5), (1,), (3,), (1, 3, 5, 7)], ids=str)
@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("g", [5, 7, 14])
def test_equals_per_r_path(r_list, n, g):
    tokens = _tokens(n, g, 24 if g == 14 else 37, np.random.default_rng())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallBatchWarning)
        out = mutual_scores_multi(layer_norm_chw(tokens), r_list)
        ref = _per_r(tokens, r_list)
    assert out.shape == (len(r_list), n, g * g) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL_FP32)


@pytest.mark.parametrize("n", [3, 6])
def test_duplicates(n):
    tokens = _tokens(n, 7, 33, np.random.default_rng(), duplicates=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallBatchWarning)
        out = mutual_scores_multi(layer_norm_chw(tokens), (1, 3, 5))
        ref = _per_r(tokens, (1, 3, 5))
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL_TIES)


def test_equals_float64_reference():
    tokens = _tokens(6, 7, 20, np.random.default_rng())
    out = mutual_scores_multi(layer_norm_chw(tokens), (1, 3, 5))
    for k, r in enumerate((1, 3, 5)):
        ref = mutual_scores_reference(lnamd_reference(tokens.numpy(), r))
        np.testing.assert_allclose(out[k].numpy(), ref, rtol=0, atol=ATOL_FP32)


@pytest.mark.parametrize("g, r", [(5, 3), (7, 5), (4, 7), (2, 5), (1, 3)])
def test_box_filter_is_the_gram_of_box_means(g, r):
    """The identity itself: the 4-D box filter of X_i X_j^T = r^4 (B_r X_i)(B_r X_j)^T, float64."""
    rng = np.random.default_rng()
    x = torch.from_numpy(rng.standard_normal((3, g * g, 6)))
    gram = torch.einsum("pc,jqc->pqj", x[0], x[1:])
    boxed = box_mean(x, r)
    expected = torch.einsum("pc,jqc->pqj", boxed[0], boxed[1:]) * r ** 4
    torch.testing.assert_close(box_filter_gram(gram, g, r), expected, rtol=1e-12, atol=1e-12)


def test_chunking_does_not_change_results():
    tokens = _tokens(7, 7, 16, np.random.default_rng())
    x = layer_norm_chw(tokens)
    base = mutual_scores_multi(x, (1, 3, 5))
    small = mutual_scores_multi(x, (1, 3, 5), block_elems=4 * 49 * 49)  # one partner per block
    torch.testing.assert_close(small, base, rtol=0, atol=0)


@pytest.mark.parametrize("layer", [0, 3])
def test_real_tokens_from_the_golden_run(golden, layer):
    tokens = torch.from_numpy(golden("golden_pipeline")["tokens"][layer][:, 1:].astype(np.float32))
    r_list = (1, 3, 5, 7)
    out = mutual_scores_multi(layer_norm_chw(tokens), r_list)
    # These tokens give distances down to 0.015, where every fp32 path (the original's included) is
    # ~1e-5 from float64; the golden README's tolerance for the pipeline's MSM maps is 2e-5.
    torch.testing.assert_close(out, _per_r(tokens, r_list), rtol=0, atol=2e-5)


def test_switch(monkeypatch):
    monkeypatch.delenv("MUSC_FAST_BOXGRAM", raising=False)  # auto: wide tokens on the CPU only
    assert use_boxgram("cpu", MIN_CHANNELS_CPU) and not use_boxgram("cpu", MIN_CHANNELS_CPU - 1)
    assert not use_boxgram("cuda", 1024)
    monkeypatch.setenv("MUSC_FAST_BOXGRAM", "1")
    assert use_boxgram("cpu", 8) and use_boxgram("cuda", 8)
    monkeypatch.setenv("MUSC_FAST_BOXGRAM", "0")
    assert not use_boxgram("cpu", 1024)
    monkeypatch.setenv("MUSC_FAST_BOXGRAM", "maybe")
    with pytest.raises(ValueError, match="MUSC_FAST_BOXGRAM"):
        use_boxgram("cpu", 1024)
    # The torch blocks serve every mode; the Triton path needs MUSC_FAST_BOXGRAM=1 (tests/kernel_cases_boxgram.py)
    monkeypatch.setenv("MUSC_FAST_MSM", "torch")
    for mode in ("auto", "1", "0"):
        monkeypatch.setenv("MUSC_FAST_BOXGRAM", mode)
        assert gram_backend_ok("cpu")


def test_pipeline_default_equals_per_r_pipeline(monkeypatch):
    from musc_fast import score_features

    rng = np.random.default_rng()
    layers = [_tokens(8, 7, 24, rng) for _ in range(2)]
    monkeypatch.setenv("MUSC_FAST_BOXGRAM", "1")
    one = score_features(layers, None, image_size=28)
    monkeypatch.setenv("MUSC_FAST_BOXGRAM", "0")
    per_r = score_features(layers, None, image_size=28)
    np.testing.assert_allclose(one.patch_scores, per_r.patch_scores, rtol=0, atol=ATOL_FP32)
