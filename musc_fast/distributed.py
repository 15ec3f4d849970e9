"""Several processes (GPUs, nodes), one result: MSM product blocks sharded over torch.distributed ranks.

Launch any entry point under torchrun, e.g.::

    torchrun --nproc-per-node 8 -m musc_fast.cli run ...                      # one node, 8 GPUs
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29500 -m musc_fast.cli run ...             # two nodes

``init_from_env()`` joins the process group that torchrun describes (NCCL when CUDA is available,
gloo on CPU); without ``WORLD_SIZE`` it does nothing and everything runs in one process.

This module holds the collectives and the ownership rules only; the MSM passes that use them are
planned and run by ``musc_fast.engine`` (tasks filtered by owner, then one merge).

Design (results are bit-for-bit those of one process running the torch path):

* **Backbone**: the images are cut into the same ``batch_size`` batches as in one process; rank k
  decodes and runs batches k, k + K, ... and the tokens are all-gathered back into image order. Every
  batch has the shape it has in one process, so its numbers are the same.
* **MSM, full table**: the product blocks of ``nearest_similarity_torch`` (``ops.msm.pair_tasks``,
  each unordered image pair once) are dealt to ranks by cost (largest first to the least loaded rank).
  Each rank fills its blocks into a ``[N, L, N]`` table of -inf and one ``all_reduce(MAX)`` merges the
  tables: every entry is written by exactly one block, so the max of it and K - 1 copies of -inf is
  that value exactly. All-reduce rather than gather because the blocks of a rank are scattered over
  the table (the symmetric trick writes rows *and* columns); the traffic, about 2 N L N 4 bytes per
  pass (11 GB at N = 1000, L = 1369, ~50 ms on NVLink), is small next to the pass's N^2 L^2 C FLOPs.
  Every rank then takes the interval mean of the whole table itself (cheap, O(N^2 L)), so all ranks
  hold the same scores and no second collective is needed.
* **MSM, streaming** (``MemoryPlan.stream_rows``): row groups are dealt round-robin; each rank writes
  the interval means of its groups into an [N, L] float64 table of zeros, and ``all_reduce(SUM)``
  merges them (x + 0 = x exactly).
* **Plan**: chunk sizes must agree on every rank (they decide the blocks), so the memory budget is the
  minimum over ranks (``min_over_ranks``) before planning.
* **Outputs**: every rank computes the same ``Result``; only ``is_main_process()`` should write files.

The engine runs the same provider on every rank (the Triton kernel takes one rank's pairs as its work
list), so sharded and single-process runs agree bit for bit per provider. On CPU, matmul results can
depend on the thread count, so compare runs with equal threads per process.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist


# --- process group ---------------------------------------------------------------------------------
def init_from_env(backend: str | None = None, timeout_s: float = 3600.0) -> bool:
    """Join the process group described by torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT). No-op returning False when WORLD_SIZE is unset.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available, else gloo.
        timeout_s: collective timeout (the first MSM pass of a big run can take minutes per rank).
    Returns:
        True when a process group is initialised (now or before).
    """
    if "WORLD_SIZE" not in os.environ:
        return False
    if dist.is_initialized():
        return True
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        # one GPU per process: "cuda" then means this rank's GPU everywhere in the pipeline
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return True


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks, 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0 or when running alone: the process that prints tables and writes outputs."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def destroy() -> None:
    """Leave the process group (call at the end of a torchrun entry point)."""
    if is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo moves CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def min_over_ranks(value: int) -> int:
    """The minimum of an integer over all ranks (the same on every rank)."""
    if world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    dev = _comm_device()
    buf = t if t.device == dev else t.to(dev)
    dist.all_reduce(buf, op=op)
    return buf if buf is t else buf.to(t.device)


# --- work sharing ----------------------------------------------------------------------------------
def shard_by_cost(costs: Sequence[int], world: int) -> list[int]:
    """Owner rank of each task: largest tasks first, each to the least loaded rank (ties: lowest rank,
    earliest task). Deterministic, so every rank computes the same assignment."""
    load = [0] * world
    owner = [0] * len(costs)
    for t in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda k: (load[k], k))
        owner[t] = r
        load[r] += costs[t]
    return owner


def owners_by_cost(costs: Sequence[int]) -> list[bool]:
    """For each task, whether this rank owns it (``shard_by_cost`` over the current ranks)."""
    me = rank()
    return [o == me for o in shard_by_cost(costs, world_size())]


def owners_round_robin(n_items: int) -> list[bool]:
    """For each of ``n_items`` equal tasks (row groups), whether this rank owns it: items rank, rank + K, ..."""
    world, me = world_size(), rank()
    return [k % world == me for k in range(n_items)]


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise max over the ranks (the merge of tables whose entries are each written by one rank,
    the others holding -inf: exact). Returns ``t`` itself when running alone."""
    return _all_reduce(t, dist.ReduceOp.MAX) if world_size() > 1 else t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Elementwise sum over the ranks (the merge of score rows each written by one rank, zeros elsewhere:
    x + 0 = x exactly). Returns ``t`` itself when running alone."""
    return _all_reduce(t, dist.ReduceOp.SUM) if world_size() > 1 else t


# --- backbone sharding -----------------------------------------------------------------------------
def _batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]


def local_indices(n: int, batch_size: int) -> list[int] | None:
    """Images this rank extracts: the batches rank, rank + K, ... of the one-process batching. None
    when there are fewer batches than ranks (then every rank extracts everything)."""
    batches = _batches(n, batch_size)
    if world_size() == 1 or len(batches) < world_size():
        return None
    return [i for s, e in batches[rank()::world_size()] for i in range(s, e)]


def gather_batches(local: torch.Tensor, n: int, batch_size: int) -> torch.Tensor:
    """Inverse of ``local_indices``: every rank's rows back in image order.

    Args:
        local: [n_local, ...] this rank's rows, in the order of ``local_indices``.
    Returns:
        [n, ...] on ``local.device``, the same on every rank.
    """
    world = world_size()
    batches = _batches(n, batch_size)
    per_rank = -(-len(batches) // world)
    rows = per_rank * batch_size
    dev = _comm_device()
    send = torch.zeros((rows, *local.shape[1:]), dtype=local.dtype, device=dev)
    send[:len(local)] = local
    # gloo moves some low-precision dtypes poorly; send the raw bits, which is exact
    raw = send.view(torch.int16) if local.dtype in (torch.float16, torch.bfloat16) else send
    parts = [torch.empty_like(raw) for _ in range(world)]
    dist.all_gather(parts, raw.contiguous())
    if raw is not send:
        parts = [p.view(local.dtype) for p in parts]
    out = torch.empty((n, *local.shape[1:]), dtype=local.dtype, device=local.device)
    for t, (s, e) in enumerate(batches):
        owner, pos = t % world, t // world
        out[s:e] = parts[owner][pos * batch_size:pos * batch_size + (e - s)].to(local.device)
    return out


def select(images, idx: list[int]):
    """The images at ``idx`` from a tensor [N, ...] or a list (paths, PIL images)."""
    if isinstance(images, torch.Tensor):
        return images[torch.as_tensor(idx, dtype=torch.long)]
    images = list(images)
    return [images[i] for i in idx]
