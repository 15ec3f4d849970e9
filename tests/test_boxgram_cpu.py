"""The fused CPU one-Gram kernel (``kernels/boxgram_cpu.py``) against the float64 reference and the torch
blocks, its switch and its fallback."""
from __future__ import annotations

import pytest
import torch

from musc_fast.kernels import boxgram_cpu
from musc_fast.ops import boxgram
from musc_fast.ops.lnamd import layer_norm_chw


def randn(rng, *shape) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape).astype("float32"))


needs_native = pytest.mark.skipif(not boxgram_cpu.available()[0], reason="no C compiler builds the native kernel")


def reference(x: torch.Tensor, r_list) -> torch.Tensor:
    """[R, N, L, N] float64 one-Gram similarities: box-filtered float64 Gram blocks, normalised."""
    x64 = x.double()
    n, length, _ = x.shape
    g = int(length ** 0.5)
    inv = boxgram.box_inverse_norms(x64.float(), r_list).double()
    sim = torch.full((len(r_list), n, length, n), float("-inf"), dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            gram = (x64[i] @ x64[j].T)[:, :, None]
            for k, r in enumerate(r_list):
                f = boxgram.box_filter_gram(gram, g, r)[:, :, 0] / float(r ** 4)
                sim[k, i, :, j] = (f * inv[k, i][:, None] * inv[k, j][None, :]).amax(dim=1)
    return sim


@needs_native
@pytest.mark.parametrize("n,g,c,r_list", [(2, 3, 5, (1,)), (3, 4, 7, (1, 3)), (5, 5, 33, (1, 3, 5)),
                                          (11, 4, 24, (3, 5, 7)), (4, 2, 6, (5,)),
                                          (2, 37, 5, (1, 3))])  # L=1369: a 518 px ViT-14 grid
def test_native_matches_float64_and_torch(rng, n, g, c, r_list):
    x = layer_norm_chw(randn(rng, n, g * g, c))
    got = boxgram.nearest_similarity_multi_native(x, list(r_list))
    ref = reference(x, list(r_list))
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), fin)
    assert (got[fin].double() - ref[fin]).abs().max() < 1e-5  # fp32 sums of <= 49 fp32 products
    torch_blocks = boxgram.nearest_similarity_multi_torch(x, list(r_list))
    assert (got[fin] - torch_blocks[fin]).abs().max() < 1e-5


@needs_native
def test_native_ties_and_duplicate_images(rng):
    x = layer_norm_chw(randn(rng, 3, 16, 9))
    x = torch.cat([x, x[:1], x[:1]])  # duplicates: exact ties of +1 similarity at r = 1
    got = boxgram.nearest_similarity_multi_native(x, [1, 3])
    ref = reference(x, [1, 3])
    fin = torch.isfinite(ref)
    assert (got[fin].double() - ref[fin]).abs().max() < 1e-5


@needs_native
def test_native_tasks_are_a_partition(rng):
    # two halves of the task list merged with max equal the whole table, bit for bit (the sharded path)
    x = layer_norm_chw(randn(rng, 13, 16, 12))
    tasks = boxgram.boxgram_tasks(13, 16, block_elems=4 * 16 * 16 * 3)
    whole = boxgram.nearest_similarity_multi_native(x, [1, 3, 5], tasks=tasks)
    a = boxgram.nearest_similarity_multi_native(x, [1, 3, 5], tasks=tasks[0::2])
    b = boxgram.nearest_similarity_multi_native(x, [1, 3, 5], tasks=tasks[1::2])
    assert torch.equal(torch.maximum(a, b), whole)


@needs_native
def test_mutual_scores_multi_uses_native_and_its_switch(rng, monkeypatch):
    x = layer_norm_chw(randn(rng, 6, 25, 40))
    native = boxgram.mutual_scores_multi(x, [1, 3])
    monkeypatch.setenv("MUSC_FAST_NATIVE", "0")
    assert boxgram.native_ok("cpu") == (False, "native: MUSC_FAST_NATIVE=0")
    torch_only = boxgram.mutual_scores_multi(x, [1, 3])
    assert (native - torch_only).abs().max() < 1e-5


def test_plan_names_the_native_provider(monkeypatch):
    from musc_fast.engine import plan_pass

    monkeypatch.setenv("MUSC_FAST_NATIVE", "0")
    assert plan_pass("onegram", n=4, length=16, device="cpu", r_list=(1, 3)).provider == "torch"
    monkeypatch.setenv("MUSC_FAST_NATIVE", "auto")
    plan = plan_pass("onegram", n=4, length=16, device="cpu", r_list=(1, 3))
    assert plan.provider == ("native" if boxgram_cpu.available()[0] else "torch")
    assert "native" in plan.reason


def test_no_compiler_falls_back_or_raises(monkeypatch, tmp_path):
    boxgram_cpu._load.cache_clear()
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    try:
        monkeypatch.setenv("MUSC_FAST_NATIVE", "auto")
        ok, why = boxgram_cpu.available()
        assert not ok and "no C compiler" in why
        monkeypatch.setenv("MUSC_FAST_NATIVE", "1")
        with pytest.raises(RuntimeError, match="MUSC_FAST_NATIVE=1"):
            boxgram_cpu.available()
        monkeypatch.setenv("MUSC_FAST_NATIVE", "sometimes")
        with pytest.raises(ValueError, match="auto, 1 or 0"):
            boxgram_cpu.native_mode()
    finally:
        boxgram_cpu._load.cache_clear()
