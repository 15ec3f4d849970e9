"""Engine acceptance cases, one function per mode, run for a provider (``MUSC_FAST_MSM``) by
tests/test_engine.py (torch, faiss, and the Triton kernels under the
interpreter on CPU): every mode equals the float64 reference within the dtype tolerance, and the plan
names the provider that ran."""
from __future__ import annotations

import warnings

import numpy as np
import torch

from musc_fast import engine
from musc_fast.memory import BankPlan, MemoryPlan
from musc_fast.ops import SmallBatchWarning, interval_bounds
from musc_fast.ops.lnamd import layer_norm_chw
from musc_fast.ops.reference import lnamd_reference, mutual_scores_aligned_reference, mutual_scores_reference
from tests.helpers import unit_rows, with_duplicates

# fp32 similarities -> float64 distances (tests/test_msm.py); exact ties: sqrt of the fp32 residue.
ATOL_FP32 = 1e-5
ATOL_TIES = 1e-3
# small awkward shapes: N = 2..5, non-power-of-two C, grids 4x4 and 5x5 (the interpreter is slow)
SHAPES = [(2, 16, 12), (3, 16, 20), (5, 25, 12)]


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallBatchWarning)
        return fn(*args, **kwargs)


def full_and_streaming(provider: str, n: int, length: int, c: int, rng: np.random.Generator) -> None:
    z = unit_rows(n, length, c, rng)
    ref = _quiet(mutual_scores_reference, z)
    for memory, mode in ((None, "full"), (MemoryPlan(stream_rows=2), "streaming"),
                         (MemoryPlan(block_elems=length * length), "full")):
        plans: list = []
        out = _quiet(engine.score_pass, torch.from_numpy(z), plan=memory, plans=plans)
        (pp,) = plans
        assert (pp.provider, pp.mode) == (provider, mode), pp.describe()
        assert out.dtype == torch.float64 and out.shape == (n, length)
        np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=ATOL_FP32, err_msg=pp.describe())


def duplicates(provider: str, rng: np.random.Generator) -> None:
    z = with_duplicates(unit_rows(5, 16, 12, rng))
    ref = mutual_scores_reference(z)
    for memory in (None, MemoryPlan(stream_rows=3)):
        out = engine.score_pass(torch.from_numpy(z), plan=memory)
        np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=ATOL_TIES)


def cross_reference(a: np.ndarray, b: np.ndarray, topmin=(0.0, 0.3)) -> np.ndarray:
    """Bank MSM in float64: new images a [B, L, C] against bank images b [M, L, C] (no self)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    s = np.einsum("ipc,jqc->ipjq", a, b).max(axis=3)  # [B, L, M]
    d = np.sort(np.sqrt(np.maximum(0.0, 2.0 - 2.0 * s)), axis=2)
    k_min, k_max = interval_bounds(b.shape[0], topmin)
    return d[:, :, k_min:k_max].mean(axis=2)


def bank(provider: str, rng: np.random.Generator) -> None:
    """New images x bank: the bank's primitive, chunked over the bank as ``Bank`` does."""
    a, b = unit_rows(3, 16, 20, rng), unit_rows(7, 16, 20, rng)
    b[2] = a[1]  # a new image that is also in the bank: its distance 0 counts (no self exclusion)
    memory = BankPlan(query_block=3, bank_chunk=4, cache_z=True, block_elems=2 * 16 * 16)
    pp = engine.plan_pass("msm", n=3, length=16, device="cpu", memory=memory, bank=True)
    assert (pp.provider, pp.mode) == (provider, "bank"), pp.describe()
    za, zb = torch.from_numpy(a), torch.from_numpy(b)
    sim = torch.cat([engine.cross_table(za, zb[m0:m0 + 4], pp) for m0 in range(0, 7, 4)], dim=2)
    k_min, k_max = interval_bounds(7, (0.0, 0.3))
    from musc_fast.engine.interval import interval_mean

    out = interval_mean(sim, k_min, k_max, provider=pp.interval, rows_per_chunk=2, n_others=7)
    # the shared image: sqrt of the fp32 residue of <a, a> = 1 (ATOL_TIES), the rest fp32 rounding
    np.testing.assert_allclose(out.numpy(), cross_reference(a, b), rtol=0, atol=ATOL_TIES)


def aligned(provider: str, rng: np.random.Generator) -> None:
    """The aligned window runs on torch whatever is asked (no provider has a window mask but torch),
    and the plan says why."""
    z = unit_rows(4, 25, 12, rng)
    for window in (1, 3):  # shift path (rows) and masked product (pairs)
        ref = mutual_scores_aligned_reference(z, window)
        for memory in (None, MemoryPlan(stream_rows=3)):
            plans: list = []
            out = engine.score_pass(torch.from_numpy(z), window=window, plan=memory, plans=plans)
            assert plans[0].provider == "torch"
            if provider != "torch":
                assert "window" in plans[0].reason, plans[0].reason
            np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=ATOL_FP32)


def one_gram(provider: str, rng: np.random.Generator) -> None:
    """Every r from one Gram block equals the per-r float64 reference (LNAMD then MSM)."""
    r_list = (1, 3)
    for n, g, c in ((2, 4, 12), (4, 5, 20)):
        tokens = (rng.standard_normal((1, g * g, c)) + rng.standard_normal((n, g * g, c))).astype(np.float32)
        x = layer_norm_chw(torch.from_numpy(tokens))
        pp = engine.plan_pass("onegram", n=n, length=g * g, device="cpu", r_list=r_list)
        assert pp.provider == provider, pp.describe()
        k_min, k_max = _quiet(interval_bounds, n - 1, (0.0, 0.3))
        out = engine.run_onegram(x, pp, k_min, k_max)
        assert out.shape == (len(r_list), n, g * g) and out.dtype == torch.float64
        for k, r in enumerate(r_list):
            ref = _quiet(mutual_scores_reference, lnamd_reference(tokens, r).astype(np.float32))
            np.testing.assert_allclose(out[k].numpy(), ref, rtol=0, atol=ATOL_FP32)


def bank_object(provider: str) -> None:
    """``Bank.score_features`` runs the engine's bank mode with the planned provider; the new image's
    row equals the float64 batch reference over bank + new image (the leave-one-in rule)."""
    from musc_fast.bank import Bank
    from tests.production_support import fake_config, random_layers

    layers = random_layers(6, 16, (12, 10), seed=5)
    bank = Bank.from_features([t[:5] for t in layers], config=fake_config(image_size=16, r_list=(1, 3)))
    res = bank.score_features([t[5:] for t in layers])
    assert [(p["layer"], p["r"], p["mode"], p["provider"]) for p in res.plan] == [
        (li, r, "bank", provider) for li in (0, 1) for r in (1, 3)]
    want = np.mean([mutual_scores_reference(lnamd_reference(t.numpy(), r))[5] for t in layers for r in (1, 3)],
                   axis=0)
    np.testing.assert_allclose(res.patch_scores.reshape(-1), want, rtol=0, atol=ATOL_FP32)


def chunked_cross(provider: str, rng: np.random.Generator) -> None:
    """Small blocks make the providers chunk both sides of a cross table (Triton: several launches of
    [za_chunk; zb_chunk]); rows with their self entries excluded equal the full table's rows."""
    z = torch.from_numpy(unit_rows(7, 16, 12, rng))
    pp = engine.plan_pass("msm", n=7, length=16, device="cpu", memory=MemoryPlan(stream_rows=5, block_elems=16 * 16))
    assert pp.provider == provider
    from musc_fast.engine.plan import NN_PROVIDERS, similarity_reference

    rows = NN_PROVIDERS[provider].cross_table(z[1:6], z, precision="fp32", window=None, block_elems=16 * 16,
                                              self_offset=1)
    want = similarity_reference(z)[1:6]
    assert torch.equal(torch.isneginf(rows), torch.isneginf(want))  # exactly the self entries
    finite = torch.isfinite(want)
    assert (rows.double()[finite] - want[finite]).abs().max().item() <= ATOL_FP32
