"""LNAMD: golden parity, torch path vs the float64 reference, shapes and errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from musc_fast import kernels
from musc_fast.ops import backend, lnamd, lnamd_multi
from musc_fast.ops.lnamd import lnamd_multi_torch
from musc_fast.ops.reference import lnamd_reference
from tests.helpers import ATOL_LNAMD, ATOL_LNAMD_OUT, DEVICE, as_numpy, on_device, public_input

# The golden README measured 1.8e-7 for an independent float64 implementation; fp32 path: 1e-6.
ATOL = 1e-6


@pytest.mark.parametrize("prefix", ["g7", "g37"])
@pytest.mark.parametrize("r", [1, 3, 5])
def test_golden_lnamd(golden, prefix, r):
    g = golden("golden_lnamd")
    tokens = g[f"{prefix}_tokens"]  # (layers, B, 1+L, C), CLS at index 0
    expected = g[f"{prefix}_out_r{r}"]  # (B, L, layers, C)
    for layer in range(tokens.shape[0]):
        out = lnamd(tokens[layer][:, 1:], r)
        np.testing.assert_allclose(out, expected[:, :, layer], rtol=0, atol=ATOL)


@pytest.mark.parametrize("r", [1, 3, 5])
def test_golden_lnamd_realistic(golden, r):
    g = golden("golden_lnamd_realistic")
    tokens = g["tokens"][0].astype(np.float32)[:, 1:]  # fp16 -> fp32 as the original's autocast LN
    np.testing.assert_allclose(lnamd(tokens, r), g[f"out_r{r}"][:, :, 0], rtol=0, atol=ATOL)


def _tokens(n, g, c, rng):
    # Outlier channels and per-image scales like real ViT tokens.
    x = rng.standard_normal((n, g * g, c)) * rng.lognormal(0, 1, c) + rng.normal(0, 5, c)
    return (x * np.arange(1, n + 1)[:, None, None]).astype(np.float32)


@pytest.mark.parametrize("n, g, c", [(2, 7, 64), (3, 5, 37), (5, 7, 100), (2, 37, 24), (4, 14, 33)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("r", [1, 3, 5, 7])
def test_torch_equals_reference(n, g, c, r):
    x = _tokens(n, g, c, np.random.default_rng())
    out = lnamd(x, r)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out, lnamd_reference(x, r), rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-6)


def test_fp16_tokens_are_normalised_in_fp32():
    x = _tokens(3, 7, 48, np.random.default_rng()).astype(np.float16)
    out = lnamd(torch.from_numpy(x), 3)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), lnamd_reference(x.astype(np.float32), 3), atol=ATOL)


def test_multi_equals_single():
    x = torch.from_numpy(_tokens(3, 7, 40, np.random.default_rng()))
    for z, r in zip(lnamd_multi(x, [1, 3, 5]), [1, 3, 5]):
        torch.testing.assert_close(z, lnamd(x, r), rtol=0, atol=0)


def test_duplicate_images_give_identical_features():
    x = _tokens(3, 7, 16, np.random.default_rng())
    x[2] = x[0]
    out = lnamd(x, 3)
    np.testing.assert_array_equal(out[2], out[0])


@pytest.mark.parametrize("r", [0, 2, -1, 4])
def test_bad_r(r):
    with pytest.raises(ValueError, match="odd and positive"):
        lnamd(np.zeros((2, 49, 8), np.float32), r)


def test_non_square_grid():
    with pytest.raises(ValueError, match="square"):
        lnamd(np.ones((2, 50, 8), np.float32), 1)


# --- the Triton LNAMD kernel, directly and through the gate -----------------------------------------


def _skewed_tokens(n, g, c, rng):
    # Outlier channels with large offsets and growing per-image scales, like real ViT tokens.
    x = rng.standard_normal((n, g * g, c)) * rng.lognormal(0, 1, c) + rng.normal(0, 5, c)
    return (x * np.arange(1, n + 1)[:, None, None]).astype(np.float32)


@pytest.mark.triton
@pytest.mark.parametrize("r_list", [[1, 3, 5], [7], [5, 1, 3, 1], [1, 3, 5, 7, 9]], ids=str)
@pytest.mark.parametrize("n, g, c", [(2, 7, 24), (3, 5, 37), (2, 3, 64), (1, 14, 33)], ids=str)
def test_lnamd_matches_reference_and_torch(n, g, c, r_list, rng):
    x = _skewed_tokens(n, g, c, rng)
    outs = kernels.lnamd_triton(on_device(x), r_list)
    assert len(outs) == len(r_list) and len({id(z) for z in outs}) == len(outs)  # no aliases
    for z, t, r in zip(outs, lnamd_multi_torch(torch.from_numpy(x), r_list), r_list):
        assert z.dtype == torch.float32 and z.shape == x.shape
        np.testing.assert_allclose(as_numpy(z), lnamd_reference(x, r), rtol=0, atol=ATOL_LNAMD)
        np.testing.assert_allclose(as_numpy(z), t.numpy(), rtol=0, atol=ATOL_LNAMD)


@pytest.mark.triton
def test_lnamd_small_patch_blocks(rng):
    """Programs that own fewer patches than a grid row (halo across program boundaries)."""
    x = _skewed_tokens(1, 6, 24, rng)
    for block_p in (1, 4):
        for z, r in zip(kernels.lnamd_triton(on_device(x), [1, 3, 5], block_p=block_p), [1, 3, 5]):
            np.testing.assert_allclose(as_numpy(z), lnamd_reference(x, r), rtol=0, atol=ATOL_LNAMD)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_lnamd_half_tokens_and_outputs(dtype, rng):
    x = _skewed_tokens(3, 7, 40, rng)
    xt = torch.from_numpy(x).to(dtype)
    ref = lnamd_reference(xt.float().numpy(), 3)  # the rounded tokens, normalised in fp32 (SPEC 2)
    z32 = kernels.lnamd_triton(xt.to(DEVICE), [3])[0]
    np.testing.assert_allclose(as_numpy(z32), ref, atol=ATOL_LNAMD)
    z16 = kernels.lnamd_triton(xt.to(DEVICE), [3], out_dtype=dtype)[0]
    assert z16.dtype == dtype
    np.testing.assert_allclose(as_numpy(z16.float()), ref, atol=ATOL_LNAMD_OUT[dtype])


@pytest.mark.triton
def test_lnamd_errors():
    with pytest.raises(ValueError, match="odd and positive"):
        kernels.lnamd_triton(on_device(np.zeros((2, 49, 8), np.float32)), [2])
    with pytest.raises(ValueError, match="square"):
        kernels.lnamd_triton(on_device(np.zeros((2, 50, 8), np.float32)), [1])


@pytest.mark.triton
def test_gate_triton_lnamd(golden, monkeypatch):
    monkeypatch.setenv("MUSC_FAST_LNAMD", "triton")
    assert backend("lnamd", DEVICE) == "triton"
    g = golden("golden_lnamd")
    for prefix in ("g37", "g7"):  # g7 last: its tokens are reused below
        tokens = public_input(np.ascontiguousarray(g[f"{prefix}_tokens"][0][:, 1:]))  # layer 0, no CLS
        outs = [as_numpy(z) for z in lnamd_multi(tokens, [1, 3, 5])]
        for out, r in zip(outs, [1, 3, 5]):
            np.testing.assert_allclose(out, g[f"{prefix}_out_r{r}"][:, :, 0], rtol=0, atol=ATOL_LNAMD)
    np.testing.assert_allclose(as_numpy(lnamd(tokens, 3)), outs[1], rtol=0, atol=0)  # single-r entry


@pytest.mark.triton
@pytest.mark.gpu
def test_gpu_lnamd_paper_grid(rng):
    x = torch.from_numpy(_skewed_tokens(4, 37, 1024, rng)).cuda().half()
    for z, t in zip(kernels.lnamd_triton(x, [1, 3, 5]), lnamd_multi_torch(x, [1, 3, 5])):
        assert (z - t).abs().max().item() <= ATOL_LNAMD
