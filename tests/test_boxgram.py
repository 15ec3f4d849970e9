"""One Gram per layer for every r: equal to the per-r LNAMD + MSM path, and to the float64 reference."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from musc_fast import kernels
from musc_fast.ops import SmallBatchWarning, interval_bounds
from musc_fast.ops.boxgram import (
    MIN_CHANNELS_CPU,
    box_filter_gram,
    box_inverse_norms,
    gram_backend_ok,
    mutual_scores_multi,
    nearest_similarity_multi_torch,
    use_boxgram,
)
from musc_fast.ops.lnamd import box_mean, layer_norm_chw, lnamd_torch
from musc_fast.ops.msm import interval_mean_from_similarity, mutual_scores_torch
from musc_fast.ops.reference import lnamd_reference, mutual_scores_reference
from tests.helpers import ATOL_SIM_FP32, ATOL_SIM_FP32_C1024, BF16_RATIO, DEVICE

try:  # the kernels' tile config (importing it imports triton); without triton the triton tests skip
    from musc_fast.kernels.boxgram import BoxGramConfig
except ImportError:
    BoxGramConfig = None

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
    # The torch blocks serve every mode; the Triton path needs MUSC_FAST_BOXGRAM=1 (the triton-marked tests below)
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


# --- the one-Gram Triton kernels (kernels/boxgram.py) against the torch path and the references -----


SMALL = None if BoxGramConfig is None else BoxGramConfig(16, 32, 16, rows_p=16, rows_q=32, cols_p=32, cols_q=16)


def _multi(x: torch.Tensor, r_list, **kwargs) -> torch.Tensor:
    """The one-Gram kernels with their norms computed by the torch path (the kernels take them as input);
    inputs the torch path refuses get dummy norms, so that the kernel's own input checks are what is tested."""
    try:
        inv = box_inverse_norms(x.float(), r_list)
    except (ValueError, RuntimeError):  # even r, a non-square L
        inv = torch.ones((len(r_list), *x.shape[:2]), device=x.device)
    return kernels.nearest_similarity_multi_triton(x, r_list, inv_norms=inv, **kwargs)


def _np_tokens(n: int, g: int, c: int, rng: np.random.Generator, duplicates: bool = False) -> np.ndarray:
    """[N, G*G, C] float32: a prototype per grid position shared by all images, per-image noise and
    per-channel offsets (like aligned objects under a ViT)."""
    x = 2.0 * rng.standard_normal((1, g * g, c)) + rng.standard_normal((n, g * g, c)) + rng.normal(0, 1, c)
    if duplicates:
        x[-1] = x[0]  # exact ties: every patch of the last image finds itself in image 0
    return x.astype(np.float32)


def _ln(tokens: np.ndarray) -> torch.Tensor:
    return layer_norm_chw(torch.from_numpy(tokens)).to(DEVICE)


def _scores(sim: torch.Tensor, n: int) -> np.ndarray:
    """[R, N, L, N] -> [R, N, L] float64 through the interval-mean kernel (the pipeline's pairing)."""
    k_min, k_max = interval_bounds(n - 1, (0.0, 0.3))
    return np.stack([kernels.interval_mean_triton(s, k_min, k_max).cpu().numpy() for s in sim])


def _reference(tokens: np.ndarray, r_list) -> np.ndarray:
    return np.stack([mutual_scores_reference(lnamd_reference(tokens, r)) for r in r_list])


@pytest.mark.triton
@pytest.mark.parametrize("n, g, c, r_list, cfg", [
    (2, 5, 24, (1, 3, 5), None), (3, 7, 37, (1, 3, 5), None), (5, 9, 20, (5, 1, 3, 1), None),
    (4, 5, 16, (3, 7), None), (3, 5, 12, (11, 1, 3, 5, 7, 9), None),  # 5 degrees > 1: two filter launches
    (3, 7, 37, (1, 3, 5), SMALL),  # small tiles are slow in the interpreter: one case
], ids=["N2-G5-C24", "N3-G7-C37", "N5-G9-C20-r5131", "N4-G5-C16-r37", "N3-G5-C12-r11..9", "N3-G7-C37-small"])
def test_boxgram_fp32_matches_torch_and_reference(n, g, c, r_list, cfg, rng):
    tokens = _np_tokens(n, g, c, rng)
    x = _ln(tokens)
    length = g * g
    # block_elems of one pair: every pair is its own chunk (chunking + scratch reuse)
    sim = _multi(x, r_list, config=cfg, block_elems=length * length)
    assert sim.shape == (len(r_list), n, length, n) and sim.dtype == torch.float32
    ref_sim = nearest_similarity_multi_torch(x.cpu(), r_list)
    off = torch.isfinite(ref_sim)
    assert torch.equal(torch.isfinite(sim.cpu()), off)  # -inf exactly on the self entries
    assert (sim.cpu()[off] - ref_sim[off]).abs().max().item() <= ATOL_SIM_FP32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallBatchWarning)
        np.testing.assert_allclose(_scores(sim, n), _reference(tokens, r_list), rtol=0, atol=ATOL_FP32)


@pytest.mark.triton
def test_boxgram_chunking_does_not_change_results(rng):
    x = _ln(_np_tokens(4, 7, 24, rng))
    whole = _multi(x, (1, 3))  # all 6 pairs in one chunk
    pairwise = _multi(x, (1, 3), block_elems=49 * 49)  # 6 chunks
    torch.testing.assert_close(pairwise, whole, rtol=0, atol=0)  # max merges are order-free


@pytest.mark.triton
@pytest.mark.parametrize("n", [3, 5])
def test_boxgram_duplicates(n, rng):
    tokens = _np_tokens(n, 7, 33, rng, duplicates=True)
    sim = _multi(_ln(tokens), (1, 3, 5))
    # The last image is a copy of image 0: each patch's nearest in image 0 is itself, for every r.
    np.testing.assert_allclose(sim[:, n - 1, :, 0].cpu().numpy(), 1.0, atol=ATOL_SIM_FP32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallBatchWarning)
        np.testing.assert_allclose(_scores(sim, n), _reference(tokens, (1, 3, 5)), rtol=0, atol=ATOL_TIES)


def _torch_low_precision_one_gram(x: torch.Tensor, r_list, precision: str) -> torch.Tensor:
    """What ops/boxgram.py's torch blocks compute on CUDA in bf16/fp16 (on the CPU they stay fp32): 16-bit
    operands, fp32 accumulation, the Gram block rounded to 16 bits (cuBLAS's output dtype), then the fp32
    box filter. [N, L, C] -> sim [R, N, L, N]."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    x32 = x.float().cpu()
    n, length, _ = x32.shape
    g = int(round(length ** 0.5))
    feats = x32.to(dtype).float()
    inv = box_inverse_norms(x32, r_list)
    sim = torch.full((len(r_list), n, length, n), float("-inf"))
    for i in range(n):
        others = [j for j in range(n) if j != i]
        gram = torch.einsum("pc,jqc->pqj", feats[i], feats[others]).to(dtype).float().contiguous()
        for k, r in enumerate(r_list):
            s = box_filter_gram(gram, g, r) * inv[k, i][:, None, None] * (inv[k, others].T / r ** 4)[None]
            sim[k, i][:, others] = s.amax(dim=1)
    return sim


@pytest.mark.triton
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_boxgram_low_precision_within_twice_torch_error(precision, rng):
    """DESIGN rule: error vs float64 at most 2x torch's own error in the same dtype, per r. Measured (6
    images, G=7, C=37, 4 draws): bf16 r=3,5 equal torch's one-Gram bf16 error (both round the Gram block
    to bf16, 0.003-0.005), r=1 about half of it (maxima from the fp32 accumulator); fp16 ~3e-4, below
    torch's fp16 block (the kernel keeps the fp16 Gram in fp32)."""
    n, r_list = 6, (1, 3, 5)
    tokens = _np_tokens(n, 7, 37, rng)
    x = _ln(tokens)
    k_min, k_max = interval_bounds(n - 1, (0.0, 0.3))
    out = _scores(_multi(x, r_list, precision=precision), n)
    ref = _reference(tokens, r_list)
    torch_sim = _torch_low_precision_one_gram(x, r_list, precision)
    torch_out = np.stack([interval_mean_from_similarity(s, k_min, k_max).numpy() for s in torch_sim])
    for k in range(len(r_list)):
        err, torch_err = np.abs(out[k] - ref[k]).max(), np.abs(torch_out[k] - ref[k]).max()
        assert err <= BF16_RATIO * torch_err, (r_list[k], err, torch_err)
        assert err > 10 * ATOL_FP32, (r_list[k], err)  # 16-bit operands really were used


@pytest.mark.triton
def test_boxgram_errors():
    x = torch.zeros((2, 25, 8), device=DEVICE)
    with pytest.raises(ValueError, match="odd and positive"):
        _multi(x, (1, 2))
    with pytest.raises(ValueError, match="precision"):
        _multi(x, (1,), precision="tf32")
    with pytest.raises(ValueError, match="square"):
        _multi(torch.zeros((2, 24, 8), device=DEVICE), (1,))
    one = _multi(torch.ones((1, 25, 8), device=DEVICE), (1, 3))
    assert one.shape == (2, 1, 25, 1) and torch.isneginf(one).all()  # one image: no partner


@pytest.fixture()
def kernel_calls(monkeypatch):
    """Counts calls of kernels.nearest_similarity_multi_triton (looked up at call time by ops.boxgram)."""
    calls = []
    real = kernels.nearest_similarity_multi_triton

    def spy(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "nearest_similarity_multi_triton", spy)
    return calls


@pytest.mark.triton
def test_mutual_scores_multi_dispatches_to_kernel(monkeypatch, kernel_calls, rng):
    tokens = _np_tokens(6, 7, 24, rng)
    x = _ln(tokens)
    monkeypatch.setenv("MUSC_FAST_MSM", "triton")
    out = mutual_scores_multi(x, (1, 3, 5))
    assert kernel_calls == [(1, 3, 5)]
    assert out.dtype == torch.float64 and out.shape == (3, 6, 49) and out.device.type == DEVICE
    np.testing.assert_allclose(out.cpu().numpy(), _reference(tokens, (1, 3, 5)), rtol=0, atol=ATOL_FP32)
    monkeypatch.setenv("MUSC_FAST_MSM", "torch")
    torch_out = mutual_scores_multi(x, (1, 3, 5))
    assert len(kernel_calls) == 1
    torch.testing.assert_close(out, torch_out, rtol=0, atol=ATOL_FP32)


@pytest.mark.triton
def test_pipeline_one_gram_triton_only_when_forced(monkeypatch, kernel_calls, rng):
    from musc_fast import score_features

    layers = [torch.from_numpy(_np_tokens(6, 7, 24, rng)).to(DEVICE) for _ in range(2)]
    monkeypatch.setenv("MUSC_FAST_MSM", "triton")
    monkeypatch.setenv("MUSC_FAST_BOXGRAM", "1")
    forced = score_features(layers, None, image_size=28)
    assert kernel_calls == [[1, 3, 5]] * 2  # one kernel call per layer, every r at once
    monkeypatch.setenv("MUSC_FAST_BOXGRAM", "auto")  # the unmeasured default: per-r Triton passes
    per_r_triton = score_features(layers, None, image_size=28)
    assert len(kernel_calls) == 2
    monkeypatch.setenv("MUSC_FAST_MSM", "torch")
    monkeypatch.setenv("MUSC_FAST_BOXGRAM", "0")
    per_r_torch = score_features(layers, None, image_size=28)
    np.testing.assert_allclose(forced.patch_scores, per_r_torch.patch_scores, rtol=0, atol=ATOL_FP32)
    np.testing.assert_allclose(per_r_triton.patch_scores, per_r_torch.patch_scores, rtol=0, atol=ATOL_FP32)


@pytest.mark.triton
@pytest.mark.gpu
def test_gpu_boxgram_paper_grid(rng):
    n = 12
    tokens = _np_tokens(n, 37, 1024, rng)
    x = layer_norm_chw(torch.from_numpy(tokens)).cuda()
    r_list = (1, 3, 5)
    k_min, k_max = interval_bounds(n - 1, (0.0, 0.3))
    ref_sim = nearest_similarity_multi_torch(x, r_list)  # cuBLAS fp32 (TF32 off) + torch filters
    sim = _multi(x, r_list)
    off = torch.isfinite(ref_sim)
    assert torch.equal(torch.isfinite(sim), off)
    assert (sim[off] - ref_sim[off]).abs().max().item() <= ATOL_SIM_FP32_C1024
    ref = torch.stack([interval_mean_from_similarity(s, k_min, k_max) for s in ref_sim])
    out = torch.stack([kernels.interval_mean_triton(s, k_min, k_max) for s in sim])
    assert (out - ref).abs().max().item() <= ATOL_FP32
    # bf16 against torch's own bf16 one-Gram blocks (real cuBLAS here), both judged against fp32.
    bf = torch.stack([kernels.interval_mean_triton(s, k_min, k_max)
                      for s in _multi(x, r_list, precision="bf16")])
    tb = torch.stack([interval_mean_from_similarity(s, k_min, k_max)
                      for s in nearest_similarity_multi_torch(x, r_list, precision="bf16")])
    for k in range(len(r_list)):
        err, torch_err = (bf[k] - ref[k]).abs().max().item(), (tb[k] - ref[k]).abs().max().item()
        assert err <= BF16_RATIO * torch_err + ATOL_FP32, (r_list[k], err, torch_err)


@pytest.mark.triton
def test_boxgram_ieee_mode_and_int32_chunk_cap(rng):
    """fp32-ieee (FMA) matches the torch one-Gram path like the split mode; chunks are capped so that the
    grids (pairs x tiles) stay within int32 program ids, e.g. r_list = [1] (no scratch) at N = 4500."""
    from musc_fast.kernels import boxgram as kb

    tokens = _np_tokens(3, 5, 37, rng)
    x = _ln(tokens)
    sim = _multi(x, (1, 3), precision="fp32-ieee")
    ref_sim = nearest_similarity_multi_torch(x.cpu(), (1, 3))
    off = torch.isfinite(ref_sim)
    assert (sim.cpu()[off] - ref_sim[off]).abs().max().item() <= ATOL_SIM_FP32
    cfg = kb._DEFAULTS["fp32"]
    n_pairs = 4500 * 4499 // 2  # 2.4e9 program ids at 128 x 64 tiles
    m = min(kb.chunk_pairs(n_pairs, 1369, 0, 1 << 24), kb.max_chunk(1369, kb._lead(1369), cfg))
    tiles = triton_cdiv(1369, cfg.block_m) * triton_cdiv(1369, cfg.block_n)
    assert n_pairs * tiles > kb.MAX_GRID and 0 < m * tiles <= kb.MAX_GRID


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
