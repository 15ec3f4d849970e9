"""One Gram block per layer for every r: mutual scoring of all LNAMD degrees from one matrix product.

LNAMD's feature for degree r is a box mean of the same LayerNorm'd map X (SPEC 2), normalised:
z_r(p) = B_r x(p) / ||B_r x(p)||. Hence the similarity of patch p of image i and patch q of image j is

    s_r(p, q) = (B_r (X_i X_j^T) B_r^T)(p, q) / (||B_r x_i(p)|| * ||B_r x_j(q)||)

i.e. a 4-D box filter (over p's grid rows/columns and q's grid rows/columns, zero padded) of the ONE
raw Gram block X_i X_j^T, divided by norms of the cheap explicit box means. The r passes of a layer
need one matrix product instead of len(r_list). ``MUSC_FAST_BOXGRAM=0`` switches the pipeline back to
per-r passes, ``=1`` forces this path; the default ``auto`` uses it where it is measured to pay
(``use_boxgram``). ``mutual_scores_multi`` (one process) follows the MSM gate (``ops.backend("msm")``):
the torch blocks below, or the Triton kernels of ``kernels/boxgram.py`` when it says ``triton``. The
pipeline's passes go through ``musc_fast.engine`` (its ``onegram`` primitive, also sharded over ranks),
whose planner takes the ``triton`` one-Gram kernels only when ``MUSC_FAST_BOXGRAM=1`` (``gram_backend_ok``).
"""
from __future__ import annotations

import torch

from ..kernels import env_switch
from .interval import interval_bounds
from .lnamd import box_mean, grid_of
from .msm import DEFAULT_BLOCK_ELEMS, _matmul_dtype, interval_mean_from_similarity, product_into

# Below this token width the box filters (memory-bound, ~25 passes over each L x L block) cost more
# than the matmuls they save on a CPU: measured crossover C ~ 300 (N=40, G=16, 1 thread: 0.87x at
# C=256, 1.34x at C=384, 1.84x at C=768; G=37, C=1024: 1.98x).
MIN_CHANNELS_CPU = 384


def boxgram_mode() -> str:
    """``MUSC_FAST_BOXGRAM``: ``auto`` (default), ``1`` (always) or ``0`` (never, per-r passes)."""
    return env_switch("MUSC_FAST_BOXGRAM")


def use_boxgram(device: torch.device | str, channels: int) -> bool:
    """Whether a layer of ``channels``-wide tokens is scored by the one-Gram path on ``device``.

    ``auto`` uses it on the CPU for C >= ``MIN_CHANNELS_CPU``. On CUDA the unfused torch filters would read
    and write every L x L block ~25 times at memory speed while a tensor-core matmul of the same block
    costs about as much as one such pass, and the Triton one-Gram kernels (``kernels/boxgram.py``: ~2.6x
    fewer seconds than per-r passes in fp32 by arithmetic, about break-even in bf16) have not been timed
    on a GPU yet, so ``auto`` keeps the per-r passes there until a measurement says otherwise.
    """
    mode = boxgram_mode()
    if mode != "auto":
        return mode == "on"
    return torch.device(device).type == "cpu" and channels >= MIN_CHANNELS_CPU


def gram_backend_ok(device: torch.device | str) -> bool:
    """Whether the MSM backend for ``device`` has a one-Gram path the pipeline may take: the torch blocks
    always; the Triton kernels only when ``MUSC_FAST_BOXGRAM=1`` forces the path (untimed on GPU); faiss
    never (per-r passes)."""
    from . import backend

    which = backend("msm", device)
    return which == "torch" or (which == "triton" and boxgram_mode() == "on")


def _box_sum_along(x: torch.Tensor, dim: int, r: int, out: torch.Tensor) -> torch.Tensor:
    """Sum over the window of r entries centred on each index of ``dim`` (zero padded), into ``out``."""
    n = x.shape[dim]
    if n == 1 or r == 1:
        return out.copy_(x)
    # The first shift writes out = x + x[next] directly (the last index has no next: a copy), which
    # saves a full copy pass; further shifts accumulate in place.
    torch.add(x.narrow(dim, 0, n - 1), x.narrow(dim, 1, n - 1), out=out.narrow(dim, 0, n - 1))
    out.narrow(dim, n - 1, 1).copy_(x.narrow(dim, n - 1, 1))
    out.narrow(dim, 1, n - 1).add_(x.narrow(dim, 0, n - 1))
    for shift in range(2, min((r - 1) // 2, n - 1) + 1):
        out.narrow(dim, 0, n - shift).add_(x.narrow(dim, shift, n - shift))
        out.narrow(dim, shift, n - shift).add_(x.narrow(dim, 0, n - shift))
    return out


def box_filter_gram(gram: torch.Tensor, g: int, r: int,
                    work: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """4-D box sum of Gram blocks over both patch grids (divide by r**4 for the box mean).

    Args:
        gram: [L, L, m] values <x_i(p), x_j(q)> for one query image i and m partners j
            (p, q row-major over a g x g grid). Partners innermost, so that every shift below is a
            long contiguous add.
        work: two flat float32 buffers of at least ``gram.numel()`` elements to ping-pong between
            (default: fresh tensors).
    Returns:
        [L, L, m]: r**4 <B_r x_i(p), B_r x_j(q)>, B_r the r x r zero-padded box mean of LNAMD; a view of
        one of the work buffers for r > 1, ``gram`` itself for r = 1.
    """
    if r == 1:
        return gram
    m = gram.shape[-1]
    shape = (g, g, g, g, m)
    bufs = [w[:gram.numel()].view(shape) for w in work] if work is not None else \
        [torch.empty(shape, dtype=gram.dtype, device=gram.device) for _ in range(2)]
    x = gram.reshape(shape)
    for dim in range(4):  # p-row, p-col, q-row, q-col: separable; ping-pong between the buffers
        x = _box_sum_along(x, dim, r, bufs[dim % 2])
    return x.reshape(g * g, g * g, m)


def boxgram_tasks(n: int, length: int, block_elems: int = DEFAULT_BLOCK_ELEMS) -> list[tuple[int, int, int]]:
    """The product blocks of the one-Gram path: (i, j0, j1) = query image i against partners [j0, j1),
    j0 > i. Every entry of the [R, N, L, N] tables (off the diagonal) is written by exactly one task, so
    tasks can run on different processes and be merged with an elementwise max."""
    # The block and a few same-sized temporaries per r live at once: budget them together.
    step = max(1, block_elems // (4 * length * length))
    return [(i, j0, min(n, j0 + step)) for i in range(n - 1) for j0 in range(i + 1, n, step)]


def box_inverse_norms(x32: torch.Tensor, r_list) -> torch.Tensor:
    """[N, L, C] float32 -> [R, N, L] float32: 1 / ||B_r x(p)|| (B_r the box mean; norms floored at 1e-12)."""
    return torch.stack([box_mean(x32, r).norm(dim=-1) for r in r_list]).clamp_min_(1e-12).reciprocal_()


def boxgram_inputs(x: torch.Tensor, r_list, precision: str = "fp32"):
    """(features [N, L, C] in the matmul dtype, the same patch-major [L, N, C], 1/||B_r x|| [R, N, L])."""
    x32 = x.float()
    inv_norms = box_inverse_norms(x32, r_list)
    feats = x32.to(_matmul_dtype(x, precision))
    # Partners interleaved patch-major so that a product block comes out as [L, L * m] with the
    # partner index innermost: every box-filter shift is then a long contiguous add.
    return feats, feats.transpose(0, 1).contiguous(), inv_norms


def boxgram_workspace(tasks: list[tuple[int, int, int]], length: int, device) -> tuple[torch.Tensor, ...]:
    """Three flat float32 buffers (the Gram block and two filter buffers) for the largest task, reused by
    every block: fresh multi-MB tensors per block cost page faults on the CPU (see ``block_workspace``)."""
    numel = max(j1 - j0 for _, j0, j1 in tasks) * length * length
    return tuple(torch.empty(numel, dtype=torch.float32, device=device) for _ in range(3))


def fill_boxgram_block(feats: torch.Tensor, by_patch: torch.Tensor, inv_norms: torch.Tensor,
                       sim: torch.Tensor, task: tuple[int, int, int], g: int, r_list,
                       work: tuple[torch.Tensor, ...] | None = None) -> None:
    """One Gram block, box-filtered and normalised per r, both directions written into ``sim``.

    ``work``: ``boxgram_workspace`` buffers (default: fresh tensors)."""
    i, j0, j1 = task
    length, c = feats.shape[1:]
    m = j1 - j0
    gram = product_into(feats[i], by_patch[:, j0:j1].reshape(length * m, c).T, work[0] if work else None)
    gram = gram.view(length, length, m)
    for k, r in enumerate(r_list):
        # s = filtered / (r^4 n_i(p) n_j(q)): two broadcast passes, no block-sized scale tensor.
        row_scale = inv_norms[k, i][:, None, None]  # [L, 1, 1]
        col_scale = inv_norms[k, j0:j1].T / float(r ** 4)  # [L, m]
        if r == 1:
            out = work[1][:gram.numel()].view(gram.shape) if work else torch.empty_like(gram)
            s = torch.mul(gram, row_scale, out=out)
        else:
            s = box_filter_gram(gram, g, r, work[1:] if work else None).mul_(row_scale)
        s.mul_(col_scale)
        # i's patches -> nearest in each j: max over q-row then q-col, so that each reduction runs over
        # long contiguous rows (a direct max over q reads rows of only m values: measured 6-13x slower)
        sim[k, i, :, j0:j1] = s.view(length, g, g * m).amax(dim=1).view(length, g, m).amax(dim=1)
        sim[k, j0:j1, :, i] = s.amax(dim=0).T  # each j's patches -> nearest in i


def native_ok(device: torch.device | str) -> tuple[bool, str]:
    """(whether the fused CPU filter kernel, ``kernels/boxgram_cpu.py``, runs the one-Gram blocks of tensors
    on ``device``, why). CPU only; ``MUSC_FAST_NATIVE=0`` turns it off, ``=1`` makes a failed build an error."""
    if torch.device(device).type != "cpu":
        return False, "native: CPU only"
    from ..kernels import boxgram_cpu

    ok, why = boxgram_cpu.available()
    return ok, f"native kernel {why}" if ok else f"native: {why}"


def native_workspace(tasks: list[tuple[int, int, int]], length: int) -> list[torch.Tensor]:
    """One [LANES * L * L] float32 buffer per partner group of the largest task (the groups' Gram blocks)."""
    from ..kernels.boxgram_cpu import LANES

    groups = max(-(-(j1 - j0) // LANES) for _, j0, j1 in tasks)
    return [torch.empty(LANES * length * length, dtype=torch.float32) for _ in range(groups)]


def fill_boxgram_block_native(flat: torch.Tensor, feats: torch.Tensor, inv_norms: torch.Tensor,
                              sim: torch.Tensor, task: tuple[int, int, int], g: int, r_list,
                              work: list[torch.Tensor]) -> None:
    """``fill_boxgram_block`` with the fused CPU kernel: the task's partners in groups of ``LANES``, one
    product [w * L, L] per group (partner-major: a contiguous slice of ``flat`` [N * L, C] times the query's
    [L, C]^T, no copy), then box filters, scales and both maxima per group in one kernel call."""
    from ..kernels.boxgram_cpu import LANES, group_maxima

    i, j0, j1 = task
    length = feats.shape[1]
    bounds = [(a, min(j1, a + LANES)) for a in range(j0, j1, LANES)]
    grams = [torch.mm(flat[a * length:b * length], feats[i].T,
                      out=buf[:(b - a) * length * length].view((b - a) * length, length)).view(b - a, length, length)
             for (a, b), buf in zip(bounds, work)]
    maxima = group_maxima(grams, g, r_list, inv_norms[:, i], [inv_norms[:, a:b] for a, b in bounds])
    for (a, b), (rowmax, colmax) in zip(bounds, maxima):
        sim[:, i, :, a:b] = rowmax.transpose(1, 2)
        sim[:, a:b, :, i] = colmax


def nearest_similarity_multi_native(x: torch.Tensor, r_list, *, tasks: list | None = None,
                                    block_elems: int = DEFAULT_BLOCK_ELEMS) -> torch.Tensor:
    """``nearest_similarity_multi_torch`` (fp32, CPU) with the fused filter kernel; ``tasks``: the one-Gram
    blocks to compute (None: every pair; -inf elsewhere)."""
    n, length, _ = x.shape
    g = grid_of(length)
    feats = x.float().contiguous()
    inv_norms = box_inverse_norms(feats, r_list)
    flat = feats.reshape(n * length, -1)
    sim = torch.full((len(r_list), n, length, n), float("-inf"), dtype=torch.float32, device=x.device)
    tasks = boxgram_tasks(n, length, block_elems) if tasks is None else tasks
    work = native_workspace(tasks, length) if tasks else None
    for task in tasks:
        fill_boxgram_block_native(flat, feats, inv_norms, sim, task, g, r_list, work)
    return sim


def nearest_similarity_multi_torch(x: torch.Tensor, r_list: tuple[int, ...] | list[int], *,
                                   precision: str = "fp32",
                                   block_elems: int = DEFAULT_BLOCK_ELEMS) -> torch.Tensor:
    """Nearest-patch similarities of every r from one Gram block per pair of images.

    For each query image i and a chunk of partners j > i: one product [L, L * m], box-filtered per r,
    scaled by the inverse norms, then row maxima (sim[r, i, :, j]) and column maxima (sim[r, j, :, i]).

    Args:
        x: [N, L, C] LayerNorm'd tokens of one layer (``layer_norm_chw``), before any box mean.
        r_list: odd degrees.
    Returns:
        sim: [R, N, L, N] float32, ``sim[k, i, p, j] = max_q s_{r_k}(p, q)`` for j != i, -inf for j == i.
    """
    n, length, _ = x.shape
    g = grid_of(length)
    feats, by_patch, inv_norms = boxgram_inputs(x, r_list, precision)
    sim = torch.full((len(r_list), n, length, n), float("-inf"), dtype=torch.float32, device=x.device)
    tasks = boxgram_tasks(n, length, block_elems)
    work = boxgram_workspace(tasks, length, x.device) if tasks else None
    for task in tasks:
        fill_boxgram_block(feats, by_patch, inv_norms, sim, task, g, r_list, work)
    return sim


def nearest_similarity_multi(x: torch.Tensor, r_list, *, precision: str = "fp32",
                             block_elems: int = DEFAULT_BLOCK_ELEMS, which: str = "torch", pairs=None) -> torch.Tensor:
    """[R, N, L, N] one-Gram similarities by ``which`` provider: the torch blocks above, or the Triton
    kernels (``kernels.nearest_similarity_multi_triton``, guarded by ``ops.run_kernel``: a failing kernel
    falls back to torch), or the fused CPU kernel (``native``). ``pairs``: the Triton work list, e.g. one
    rank's blocks (None: every pair)."""
    if which == "native":
        return nearest_similarity_multi_native(x, list(r_list), block_elems=block_elems)
    if which == "triton":
        from .. import kernels
        from . import run_kernel

        inv = box_inverse_norms(x.float(), r_list)
        return run_kernel(("boxgram", precision), x.device,
                          lambda: kernels.nearest_similarity_multi_triton(
                              x, r_list, inv_norms=inv, grid=grid_of(x.shape[1]), precision=precision,
                              block_elems=block_elems, pairs=pairs),
                          lambda: nearest_similarity_multi_torch(x, r_list, precision=precision,
                                                                 block_elems=block_elems))
    return nearest_similarity_multi_torch(x, r_list, precision=precision, block_elems=block_elems)


def mutual_scores_multi(x: torch.Tensor, r_list: tuple[int, ...] | list[int],
                        topmin: tuple[float, float] = (0.0, 0.3), *, compat: bool = False,
                        precision: str = "fp32", block_elems: int = DEFAULT_BLOCK_ELEMS) -> torch.Tensor:
    """MSM patch scores of every r of one layer, from one Gram block per image pair (one process; the
    engine, ``musc_fast.engine``, runs the same blocks sharded over ranks).

    Args:
        x: [N, L, C] LayerNorm'd tokens (``layer_norm_chw``).
    Returns:
        [R, N, L] float64, equal to ``mutual_scores(lnamd(tokens, r))`` for each r (within fp32 rounding).

    Backend: the MSM gate (``ops.backend("msm")``) picks the Triton kernels
    (``kernels.nearest_similarity_multi_triton`` + the interval-mean kernel) or, otherwise, the fused CPU
    kernel where it runs (``native_ok``: CPU, fp32, ``MUSC_FAST_NATIVE``) or the torch blocks.
    """
    from . import backend, interval_mean

    k_min, k_max = interval_bounds(x.shape[0] - 1, topmin, compat=compat)
    if backend("msm", x.device, x.dtype, precision) == "triton":
        sim = nearest_similarity_multi(x, r_list, precision=precision, block_elems=block_elems, which="triton")
        return torch.stack([interval_mean(s, k_min, k_max) for s in sim])
    native = native_ok(x.device)[0]  # CPU products are fp32 at every precision (``_matmul_dtype``)
    sim = nearest_similarity_multi(x, list(r_list), precision=precision, block_elems=block_elems,
                                   which="native" if native else "torch")
    return torch.stack([interval_mean_from_similarity(s, k_min, k_max) for s in sim])
