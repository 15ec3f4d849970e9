"""Loading local weight files into backbones, safely and with clear errors.

Every backbone accepts ``weights=PATH``. This module turns such a file into a state dict that fits a
given module:

1. ``read_state_dict(path)``: ``.safetensors`` through safetensors; ``.pt``/``.pth``/``.bin``
   through ``torch.load(weights_only=True)`` (never full unpickling), or, for TorchScript archives
   such as OpenAI's CLIP ``.pt`` files, ``torch.jit.load(map_location='cpu').state_dict()``. A
   checkpoint dict that wraps the state dict (``state_dict``, ``model``, ``teacher``, ...) is
   unwrapped.
2. ``select_prefix(sd, expected)``: keep the keys under the one prefix (``''``, ``module.``,
   ``visual.``, ``teacher.backbone.``, ...) that matches most of the expected names, and strip it.
   A full open_clip checkpoint thus yields its visual tower; the text tower is left out.
3. ``check_fits(sd, expected, source)``: ValueError naming the file and the first missing,
   unexpected and shape-mismatched key (with both shapes).
4. ``load_weights(module, sd, source=...)``: all of the above plus an optional ``adapt`` hook (the
   ViTs resize their positional embedding there), then a strict ``load_state_dict``.
"""
from __future__ import annotations

import os
import zipfile
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

StateDict = dict[str, torch.Tensor]

# Keys under which training checkpoints commonly nest the model's state dict, tried in this order.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "teacher", "net")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript zips hold compiled code under ``<archive>/code/``; plain torch.save zips do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in name or name.startswith("code/") for name in zf.namelist())


def _unwrap(obj: object, path: Path) -> StateDict:
    """Find the ``{name: tensor}`` mapping inside a loaded checkpoint object."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                return _unwrap(obj[key], path)
        # A mapping mixing tensors with metadata (e.g. OpenAI's 'input_resolution' ints): keep tensors.
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise ValueError(f"{path}: expected a state dict (names -> tensors), got {type(obj).__name__}")


def unreadable_weights_message(path: Path, exc: BaseException) -> str:
    """One line for a file ``torch.load(weights_only=True)`` refuses. Torch's own text advises
    ``weights_only=False``, which would run the file's pickled code: not repeated here."""
    text = str(exc)
    detail = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else ""
    detail = next((line.strip() for line in detail.splitlines() if line.strip()), "")
    detail = detail.split(" was not an allowed global", 1)[0]  # drop torch's allowlisting advice too
    if "Unsupported global" in text:
        why = f"it is not a plain state dict (names -> tensors only): it pickles Python objects ({detail})"
    elif detail:
        why = f"it is not a plain state dict (names -> tensors only), perhaps not a torch file at all ({detail})"
    else:
        first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
        why = f"it is not a torch weights file ({first})"
    return (f"{path}: torch.load(weights_only=True) cannot read it safely: {why}. To convert it, load it "
            "yourself only in a trusted environment and save just the tensors, e.g. "
            "torch.save(model.state_dict(), 'plain.pt') "
            "or safetensors.torch.save_file(model.state_dict(), 'plain.safetensors'), then pass that file")


def read_state_dict(path: str | Path) -> StateDict:
    """Read a weights file into ``{name: tensor}`` on the CPU.

    Args:
        path: ``.safetensors``, or ``.pt``/``.pth``/``.bin``/``.ckpt`` (torch pickle read with
            ``weights_only=True``, or a TorchScript archive).
    Returns:
        the state dict, tensors in the file's dtype.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"weights file not found: {str(path)!r}")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(p), device="cpu"))
    if suffix not in _TORCH_SUFFIXES:
        raise ValueError(f"{p}: unsupported weights file type {suffix!r}; expected .safetensors, "
                         f"{', '.join(_TORCH_SUFFIXES)}")
    if _is_torchscript_archive(p):
        # OpenAI's CLIP checkpoints are TorchScript archives; loading them runs no Python pickle code.
        return dict(torch.jit.load(str(p), map_location="cpu").state_dict())
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # the pickle holds non-tensor objects, or is not a torch file at all
        raise ValueError(unreadable_weights_message(p, exc)) from exc
    return _unwrap(obj, p)


def select_prefix(sd: Mapping[str, torch.Tensor], expected: Iterable[str]) -> StateDict:
    """Keep the keys under the prefix that best matches ``expected`` names, with the prefix stripped.

    Each key votes for every prefix ``P`` such that ``key == P + name`` for an expected ``name``; the
    prefix with most votes wins (the shorter one on ties). Keys outside it are dropped (e.g. the
    text tower of a full CLIP checkpoint). With no vote at all the dict is returned unchanged, so
    that ``check_fits`` reports the mismatch.
    """
    names = set(expected)
    votes: Counter[str] = Counter()
    for key in sd:
        parts = key.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in names:
                votes[".".join(parts[:i]) + ("." if i else "")] += 1
    if not votes:
        return dict(sd)
    best = max(votes.items(), key=lambda kv: (kv[1], -len(kv[0])))[0]
    return {k[len(best):]: v for k, v in sd.items() if k.startswith(best)}


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def check_fits(sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise ValueError naming ``source`` and the first missing/unexpected/mismatched key, if any."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        k = missing[0]
        problems.append(f"{len(missing)} missing keys, first {k!r} (model expects {_shape(expected[k])})")
    if unexpected:
        k = unexpected[0]
        problems.append(f"{len(unexpected)} unexpected keys, first {k!r} (file has {_shape(sd[k])})")
    if mismatched:
        k = mismatched[0]
        problems.append(
            f"{len(mismatched)} shape mismatches, first {k!r}: file has {_shape(sd[k])}, "
            f"model expects {_shape(expected[k])}"
        )
    raise ValueError(f"{source}: weights do not fit this architecture: " + "; ".join(problems))


def load_weights(
    module: nn.Module,
    weights: str | Path | Mapping[str, torch.Tensor],
    *,
    source: str | None = None,
    adapt: Callable[[StateDict], StateDict] | None = None,
    ignore: Iterable[str] = (),
) -> None:
    """Load a weights file (or an already read state dict) into ``module``, strictly.

    ``module`` may live on the meta device (built without random init); it then adopts the loaded
    tensors (``load_state_dict(assign=True)``), cast to its declared dtypes.

    Args:
        module: the target (e.g. an open_clip visual tower or a timm model).
        weights: a path (see ``read_state_dict``) or a ``{name: tensor}`` mapping.
        source: how to name the weights in errors (defaults to the path).
        adapt: applied after the prefix is stripped and before checking, e.g. to resize a
            positional embedding to the module's grid or to rename keys.
        ignore: file keys that are known to be unused by ``module`` and are dropped
            (e.g. DINOv2's ``mask_token``).
    """
    if isinstance(weights, (str, Path)):
        source = source or str(weights)
        sd = read_state_dict(weights)
    else:
        source = source or "state dict"
        sd = dict(weights)
    expected = module.state_dict()
    sd = select_prefix(sd, expected)
    if adapt is not None:
        sd = adapt(sd)
    drop = set(ignore)
    sd = {k: v for k, v in sd.items() if k not in drop}
    check_fits(sd, expected, source)
    # A module built on the meta device (no random init to waste time on) takes the file's tensors
    # as its own, cast to the dtype it was declared with.
    on_meta = any(t.is_meta for t in expected.values())
    if on_meta:
        sd = {k: v.to(expected[k].dtype) for k, v in sd.items()}
    module.load_state_dict(sd, strict=True, assign=on_meta)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{source}: {type(module).__name__} has tensors no key fills, first {left[0]!r}")


def resize_pos_embed(pos: torch.Tensor, grid: int, *, offset: float = 0.0) -> torch.Tensor:
    """Resize a ViT positional embedding with one leading CLS entry to a ``grid`` x ``grid`` patch grid.

    Bicubic, align_corners=False, no antialiasing, computed in float32 and cast back (SPEC 1.4).

    Args:
        pos: [1 + g*g, C] (open_clip layout) or [1, 1 + g*g, C] (timm layout).
        grid: G, the new grid side.
        offset: 0 resizes to an output *size* of G (open_clip's ``resize_pos_embed``). A positive
            offset instead passes ``scale_factor = (G + offset) / g`` as DINO v1/v2 do (offset 0.1);
            the output size is still G but the sampling positions follow the scale factor.
    Returns:
        the embedding in the input's layout with 1 + G*G entries (unchanged if g == G).
    """
    batched = pos.ndim == 3
    flat = pos[0] if batched else pos
    n, c = flat.shape
    g = int(round((n - 1) ** 0.5))
    if g * g != n - 1:
        raise ValueError(f"positional embedding: expected 1 + g*g entries, got {n}")
    if g == grid:
        return pos
    cls, patches = flat[:1], flat[1:]
    img = patches.float().reshape(1, g, g, c).permute(0, 3, 1, 2)
    if offset:
        scale = (grid + offset) / g
        img = F.interpolate(img, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    else:
        img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False)
    if img.shape[-1] != grid:  # floor((G + offset) / g * g) must give G; guard against rounding surprises
        raise ValueError(f"positional embedding resize gave a {img.shape[-1]}-grid, expected {grid}")
    patches = img.permute(0, 2, 3, 1).reshape(grid * grid, c).to(flat.dtype)
    out = torch.cat([cls, patches], dim=0)
    return out.unsqueeze(0) if batched else out


def pos_embed_adapter(key: str, grid: int, *, offset: float = 0.0):
    """An ``adapt`` hook for ``load_weights``: resize ``sd[key]`` to ``grid`` when its grid differs."""

    def adapt(sd: StateDict) -> StateDict:
        if key in sd:
            t = sd[key]
            n = t.shape[-2] if t.ndim in (2, 3) else 0
            g = int(round(max(n - 1, 0) ** 0.5))
            if n > 1 and g * g == n - 1 and (t.ndim == 2 or t.shape[0] == 1):
                sd = dict(sd)
                sd[key] = resize_pos_embed(t, grid, offset=offset)
        return sd

    return adapt


# --- offline: fail fast instead of waiting for the hub's retries -------------------------------------
HUB_HOST = "huggingface.co"
_TRUE = ("1", "true", "yes", "on")


def hub_offline_by_env() -> bool:
    """Whether the user asked for Hugging Face's offline mode (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(host: str = HUB_HOST, timeout: float = 2.0) -> bool:
    """One TCP connection to ``host``:443 within ``timeout`` seconds (no request is sent)."""
    import socket

    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


# Backbone name -> fn(backbone, pretrained) giving the Hugging Face repo its weights are downloaded
# from (or None). Filled by the backbone modules that download (dino.py, clip.py), so that this module,
# which they import, imports none of them.
_HUB_REPOS: dict[str, Callable[[str, str], str | None]] = {}


def register_hub_repo(names: Iterable[str], repo_of: Callable[[str, str], str | None]) -> None:
    """Declare where the weights of the backbones ``names`` come from (``repo_of(backbone, pretrained)``)."""
    for n in names:
        _HUB_REPOS[n] = repo_of


def hub_repo_for(backbone: str, pretrained: str) -> str | None:
    """The Hugging Face repo the normal download path fetches ``backbone``/``pretrained`` from, or None
    for backbones whose weights are not downloaded (e.g. efficientnet_lite0's pip package)."""
    repo_of = _HUB_REPOS.get(backbone)
    return None if repo_of is None else repo_of(backbone, pretrained)


def hub_cached(repo: str) -> bool:
    """Whether the local Hugging Face cache holds a weights file of ``repo`` (any snapshot)."""
    try:
        from huggingface_hub import constants

        cache = Path(constants.HF_HUB_CACHE)
    except Exception:
        cache = Path(os.environ.get("HF_HUB_CACHE") or Path.home() / ".cache" / "huggingface" / "hub")
    snapshots = cache / ("models--" + repo.replace("/", "--")) / "snapshots"
    suffixes = (".safetensors", ".bin", ".pt", ".pth")
    return snapshots.is_dir() and any(p.suffix in suffixes for p in snapshots.rglob("*"))


def use_hub_offline_mode() -> None:
    """Make huggingface_hub take cached files at once instead of retrying the network."""
    import sys

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # read at import time: set the live value too
        constants.HF_HUB_OFFLINE = True


def check_download_possible(backbone: str, pretrained: str | None, weights: str | None, *,
                            probe: Callable[[], bool] | None = None) -> None:
    """Raise ValueError (one line) when ``backbone``'s weights would be downloaded but cannot be: offline
    (``HF_HUB_OFFLINE`` set, or ``probe()`` false, default ``hub_reachable``: no connection to the hub
    within ~2 s) and not in the local cache. Probes only when a download would happen (no ``weights``
    file, a ``pretrained`` tag, a backbone fetched from the hub). Offline with the weights cached:
    switches huggingface_hub to offline mode so that the cached copy is used without retries."""
    if weights is not None or pretrained is None:
        return
    repo = hub_repo_for(backbone, pretrained)
    if repo is None:
        return
    offline = hub_offline_by_env() or not (probe or hub_reachable)()
    if not offline:
        return
    if hub_cached(repo):
        use_hub_offline_mode()
        return
    why = "HF_HUB_OFFLINE is set" if hub_offline_by_env() else f"{HUB_HOST} cannot be reached"
    raise ValueError(f"{backbone}/{pretrained} weights must be downloaded from {HUB_HOST} ({repo}) but {why} and "
                     "they are not in the local cache; offline, use --backbone efficientnet_lite0 (weights from "
                     "a pip package) or --weights PATH (a local weights file)")
