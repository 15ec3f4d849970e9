"""``musc-fast tune``: measure the providers of each scoring pass here, fill the dispatch cache, print the table.

For the preset's token shapes (one pass per distinct (L, C) of its tapped layers), each provider that
can run here is timed on random unit-row tokens of a few images (``--slice-images``: 4 images = 6
image pairs), checked against a float64 reference, and the fastest within the precision's error bound
is stored under the key of a run of ``--images`` images (``musc_fast.engine.dispatch``). A later run
with the same key reads the winner instead of measuring.

``candidates_for`` builds the providers of one pass from the public ops (``ops.nearest_similarity``
forced to each backend through ``MUSC_FAST_MSM``); the engine's providers replace it.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .engine.dispatch import (
    DISPATCH_ENV,
    SIMILARITY_ERROR_BOUND,
    Choice,
    DispatchCache,
    DispatchKey,
    choose,
    dispatch_mode,
)
from .engine.plan import similarity_reference  # the float64 reference the planner's dispatch uses too

PASS_KINDS = ("nearest_similarity",)
MSM_PROVIDERS = ("torch", "triton", "faiss")

DESCRIPTION = """\
Measure which provider (torch, triton, faiss) is fastest for each scoring pass of a preset on this
machine, and store the decision in the dispatch cache ($MUSC_FAST_CACHE, default ~/.cache/musc_fast,
file dispatch-v1.json) so that runs skip the measurement. Each provider runs on random tokens of the
preset's shape for a few images; one whose result is off by more than the precision's bound, or that
fails, is never chosen. Prints, per pass and shape bucket, every provider's time (ms, median of
--repeats calls), its max error against a float64 reference and the winner.

Runs measure on CUDA and use the static order on the CPU unless MUSC_FAST_DISPATCH=measure;
MUSC_FAST_DISPATCH=static turns measuring off (this command then prints the static choice);
MUSC_FAST_MSM=torch|triton|faiss still forces one provider."""


@dataclass
class Candidates:
    """The providers of one pass on one slice.

    Attributes:
        calls: provider name -> a call returning the pass's output on the slice.
        reference: the float64 output they are held to.
        tolerance: max |output - reference| allowed.
        unavailable: provider name -> why it cannot run here.
        static_order: the preference order used when measuring is off.
    """

    calls: dict[str, Callable[[], torch.Tensor]]
    reference: torch.Tensor
    tolerance: float
    unavailable: dict[str, str] = field(default_factory=dict)
    static_order: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _forced_msm(name: str) -> Iterator[None]:
    saved = os.environ.get("MUSC_FAST_MSM")
    os.environ["MUSC_FAST_MSM"] = name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MUSC_FAST_MSM", None)
        else:
            os.environ["MUSC_FAST_MSM"] = saved


def _run_forced(name: str, z: torch.Tensor, precision: str) -> torch.Tensor:
    from . import ops

    # A kernel that fails falls back to torch with a warning: here that must fail the candidate,
    # or the torch path would be timed under the kernel's name.
    with _forced_msm(name), warnings.catch_warnings():
        warnings.simplefilter("error", ops.KernelFallbackWarning)
        return ops.nearest_similarity(z, precision=precision)


def candidates_for(pass_kind: str, z: torch.Tensor, precision: str) -> Candidates:
    """The providers of ``pass_kind`` that can run here on the slice ``z`` [n, L, C] (unit rows).

    ``MUSC_FAST_MSM`` set to one provider leaves only that one; ``auto`` (or unset) tries them all.
    """
    from . import ops

    if pass_kind not in PASS_KINDS:
        raise ValueError(f"unknown pass kind {pass_kind!r}; expected one of {', '.join(PASS_KINDS)}")
    forced = os.environ.get("MUSC_FAST_MSM", "auto").strip().lower()
    names = MSM_PROVIDERS if forced in ("", "auto") else (forced,)
    calls, unavailable = {}, {}
    for name in names:
        try:
            with _forced_msm(name):
                ops.backend("msm", z.device, z.dtype, precision)  # raises when it cannot run here
        except (RuntimeError, ValueError) as exc:
            unavailable[name] = " ".join(str(exc).split()).split("cannot run here: ", 1)[-1]
            continue
        if name == "triton" and not ops.kernel_ok(("mutual_min", precision), z.device):
            unavailable[name] = "the kernel failed its first-use probe (KernelFallbackWarning)"
            continue
        calls[name] = functools.partial(_run_forced, name, z, precision)
    static = ops.backend("msm", z.device, z.dtype, precision) if forced in ("", "auto") else forced
    return Candidates(calls=calls, reference=similarity_reference(z), tolerance=SIMILARITY_ERROR_BOUND[precision],
                      unavailable=unavailable, static_order=[static, *(n for n in calls if n != static)])


def pass_shapes(config, n: int) -> list[tuple[str, tuple[int, int, int]]]:
    """(pass kind, (N, L, C)) of every distinct pass of a run of ``n`` images with ``config``. The
    backbone is built on the meta device (no weights, no memory) just to read its grid and widths."""
    from .backbones import build_backbone

    with torch.device("meta"):
        model = build_backbone(config.backbone, pretrained=None, image_size=config.image_size,
                               layers=config.layers, quick_gelu=config.quick_gelu, compat=config.compat)
    length = model.grid_size(config.image_size) ** 2
    return [("nearest_similarity", (n, length, c)) for c in dict.fromkeys(model.tap_dims)]


@dataclass
class TuneRow:
    """One decision: the passes (N, L, C) sharing its key, and what ``choose`` returned."""

    pass_kind: str
    shapes: list[tuple[int, int, int]]
    key: DispatchKey
    choice: Choice
    unavailable: dict[str, str]


def tune(config, n: int, device: torch.device, *, slice_images: int = 4, repeats: int = 5, force: bool = False,
         mode: str = "measure", cache: DispatchCache | None = None, seed: int = 0) -> list[TuneRow]:
    """Decide (measure or read back) the provider of every pass of ``config`` for ``n`` images."""
    precision = config.msm_precision
    rows: dict[DispatchKey, TuneRow] = {}
    for pass_kind, (_, length, c) in pass_shapes(config, n):
        key = DispatchKey.for_pass(pass_kind, (n, length, c), precision, device)
        if key in rows:  # same bucket as an earlier pass: one decision serves both
            rows[key].shapes.append((n, length, c))
            continue
        gen = torch.Generator().manual_seed(seed)
        z = torch.nn.functional.normalize(torch.randn(min(n, slice_images), length, c, generator=gen), dim=-1)
        cand = candidates_for(pass_kind, z.to(device), precision)
        if not cand.calls:
            raise RuntimeError(f"no provider can run {pass_kind} here: "
                               + "; ".join(f"{k}: {v}" for k, v in cand.unavailable.items()))
        choice = choose(key, cand.calls, cand.reference, cand.tolerance, cache=cache, repeats=repeats,
                        static_choice=cand.static_order, mode=mode, force=force)
        rows[key] = TuneRow(pass_kind, [(n, length, c)], key, choice, cand.unavailable)
    return list(rows.values())


def format_table(rows: list[TuneRow]) -> str:
    """One line per (pass, provider): time, max error, and winner / why it was not chosen."""
    head = ("pass", "shape (bucket)", "precision", "provider", "ms", "max error", "")
    lines = [head]
    for row in rows:
        ch = row.choice
        (n, length, _), cs = row.shapes[0], "/".join(str(s[2]) for s in row.shapes)
        shape = f"N{n} L{length} C{cs} ({row.key.shape_bucket})"
        names = list(dict.fromkeys([*ch.ms, *ch.excluded, ch.winner, *row.unavailable]))
        for k, name in enumerate(names):
            ms = f"{ch.ms[name]:.3f}" if name in ch.ms else "-"
            err = f"{ch.error[name]:.2e}" if name in ch.error else "-"
            if name == ch.winner:
                note = "winner" + (" (cached)" if ch.from_cache else "") + (" (static order)" if ch.mode == "static"
                                                                            else "")
            elif name in ch.excluded:
                note = f"excluded: {ch.excluded[name]}"
            elif name in row.unavailable:
                note = f"unavailable: {row.unavailable[name]}"
            else:
                note = ""
            first = k == 0
            lines.append((row.pass_kind if first else "", shape if first else "", row.key.precision if first else "",
                          name, ms, err, note))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] for line in lines)


def add_tune_command(subparsers: argparse._SubParsersAction) -> None:
    """Add ``tune`` to an argparse sub-command set."""
    from .config import MSM_PRECISIONS, PRESETS

    p = subparsers.add_parser("tune", help="measure the fastest provider per scoring pass here and cache it",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="paper",
                   help="the configuration whose passes are tuned (default paper)")
    p.add_argument("--image-size", type=int, help="input side S (default the preset's)")
    p.add_argument("-n", "--images", type=int, default=200,
                   help="images of the run to tune for (its power-of-two bucket is the key; default 200)")
    p.add_argument("--precision", "--msm-precision", dest="msm_precision", choices=list(MSM_PRECISIONS),
                   help="mutual-scoring precision, as run's --msm-precision (default the preset's)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--slice-images", type=int, default=4,
                   help="images in the measured slice (default 4, i.e. 6 image pairs)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per provider (median; default 5)")
    p.add_argument("--force", action="store_true", help="measure again even when the cache has the answer")


def run_tune(args: argparse.Namespace) -> int:
    """``musc-fast tune``: settings are checked first (ValueError -> exit 2), then the passes are tuned."""
    from .config import MuScConfig, check_device_available

    if args.images < 2:
        raise ValueError(f"--images must be >= 2 (MuSc scores images against each other), got {args.images}")
    if args.slice_images < 2:
        raise ValueError(f"--slice-images must be >= 2, got {args.slice_images}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    overrides = {k: v for k, v in (("image_size", args.image_size), ("msm_precision", args.msm_precision),
                                   ("device", args.device)) if v is not None}
    config = MuScConfig.preset(args.preset, **overrides)
    check_device_available(config.device)
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available()
                          else "cpu" if config.device == "auto" else config.device)
    runs_mode = dispatch_mode(device)  # also rejects a bad MUSC_FAST_DISPATCH before any work
    explicit = os.environ.get(DISPATCH_ENV, "auto").strip().lower()
    mode = "static" if explicit == "static" else "measure"
    cache = DispatchCache()
    rows = tune(config, args.images, device, slice_images=args.slice_images, repeats=args.repeats,
                force=args.force, mode=mode, cache=cache)
    print(format_table(rows))
    if mode == "static":
        print(f"\n{DISPATCH_ENV}=static: nothing measured, nothing stored")
    else:
        print(f"\ndispatch cache: {cache.path}")
        if runs_mode == "static":
            print(f"note: runs on {device.type} use the static order; set {DISPATCH_ENV}=measure to use these")
    return 0
