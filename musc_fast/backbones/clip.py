"""CLIP ViT image towers (open_clip weights), tapped as the original MuSc taps them (SPEC 1.3, 1.4).

Registered names: ViT-B-32, ViT-B-16, ViT-B-16-plus-240, ViT-L-14, ViT-L-14-336.

* Weights: ``pretrained`` = one of the tags the original supports (``openai``, ``laion400m_e31``,
  ``laion400m_e32``, per model), fetched by open_clip's own download code; ``None`` = random init
  (no download); ``weights=PATH`` = a local file (overrides ``pretrained`` for loading, see
  ``weights.py``). ``pretrained`` still names the weights' origin for the activation rule below, so
  pass ``pretrained='openai'`` together with a local copy of OpenAI's weights.
* Image size: the tower is built for G = S // p patches per side. A checkpoint's positional
  embedding is resized from its own grid to G with bicubic interpolation (align_corners=False, no
  antialias), as the original's vendored open_clip does.
* Taps: the raw residual stream right after 0-based block l (no ``ln_post``, no projection), CLS
  dropped: one [B, G*G, C] tensor per requested layer.
* Image token (for RsCIN): ``ln_post(CLS after the last block) @ proj``, L2-normalised: [B, D].
* Activation quirk (SPEC 1.4): the original only keeps QuickGELU for ``pretrained='openai'`` at the
  model's native size; everything else (other sizes, other tags, random init) runs exact GELU. That is
  the default here; ``quick_gelu=True/False`` forces one. ``compat`` changes nothing for CLIP.
* Attention runs through ``F.scaled_dot_product_attention`` (flash/memory-efficient kernels on CUDA),
  or xformers when installed (``attention.py``); the attention weights are never materialised.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attend
from .base import CLIP_PREPROCESS, Backbone, BackboneOutput, check_layers, register_backbone
from .weights import load_weights, pos_embed_adapter, register_hub_repo

# Model -> pretrained tags the original supports (SPEC 1.3).
CLIP_TAGS: dict[str, tuple[str, ...]] = {
    "ViT-B-32": ("openai", "laion400m_e31", "laion400m_e32"),
    "ViT-B-16": ("openai", "laion400m_e31", "laion400m_e32"),
    "ViT-B-16-plus-240": ("laion400m_e31", "laion400m_e32"),
    "ViT-L-14": ("openai", "laion400m_e31", "laion400m_e32"),
    "ViT-L-14-336": ("openai",),
}


def _hub_repo(backbone: str, pretrained: str) -> str | None:
    """The Hugging Face repo open_clip downloads ``backbone``/``pretrained`` from (None: unknown)."""
    try:
        import open_clip

        cfg = open_clip.get_pretrained_cfg(backbone, pretrained) or {}
    except Exception:  # open_clip missing or tag unknown: the builder reports that itself
        return None
    hub = cfg.get("hf_hub", "")
    return os.path.split(hub)[0] or None if hub else None


register_hub_repo(CLIP_TAGS, _hub_repo)

# open_clip vision_cfg keys this module knows how to build; anything else would change the network.
_SUPPORTED_VISION_KEYS = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SDPABlock(nn.Module):
    """One open_clip ``ResidualAttentionBlock``, run with SDPA attention.

    It keeps the block's submodules under the same names (``ln_1``, ``attn``, ``ls_1``, ``ln_2``,
    ``mlp``, ``ls_2``), so state-dict keys are unchanged; only the forward differs: the attention is
    computed from ``attn``'s packed in-projection with ``F.scaled_dot_product_attention``.
    """

    def __init__(self, block: nn.Module, act: nn.Module):
        super().__init__()
        attn = block.attn
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim \
                or attn.bias_k is not None or attn.add_zero_attn or not attn.batch_first:
            raise ValueError(f"unsupported open_clip attention block: {type(attn).__name__}")
        self.ln_1, self.attn, self.ls_1 = block.ln_1, attn, block.ls_1
        self.ln_2, self.mlp, self.ls_2 = block.ln_2, block.mlp, block.ls_2
        self.mlp.gelu = act  # the GELU/QuickGELU choice lives in the MLP, as in open_clip
        self.num_heads = attn.num_heads

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, C] -> multi-head self-attention output [B, T, C]."""
        b, t, c = x.shape
        qkv = F.linear(x, self.attn.in_proj_weight, self.attn.in_proj_bias)
        q, k, v = qkv.view(b, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        o = attend(q, k, v)  # [B, H, T, C/H]
        o = o.transpose(1, 2).reshape(b, t, c)
        return F.linear(o, self.attn.out_proj.weight, self.attn.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls_1(self.attention(self.ln_1(x)))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class ClipViT(Backbone):
    """open_clip ``VisionTransformer`` weights under ``self.visual``; see the module docstring."""

    def __init__(self, name: str, visual: nn.Module, *, image_size: int, layers: tuple[int, ...],
                 quick_gelu: bool):
        super().__init__()
        self.visual = visual
        self.name = name
        self.patch_size = int(visual.conv1.kernel_size[0])
        self.depth = len(visual.transformer.resblocks)
        self.layers = check_layers(name, layers, self.depth)
        self.embed_dim = int(visual.conv1.out_channels)
        self.cls_dim = int(visual.proj.shape[1])
        self.preprocess = CLIP_PREPROCESS
        self.image_size = int(image_size)
        self.quick_gelu = bool(quick_gelu)
        blocks = visual.transformer.resblocks
        for i in range(len(blocks)):
            blocks[i] = SDPABlock(blocks[i], QuickGELU() if quick_gelu else nn.GELU())

    def forward(self, images: torch.Tensor, need_cls: bool = True) -> BackboneOutput:
        """images [B, 3, S, S] -> tokens [[B, G*G, C] per layer], cls [B, D] (or None)."""
        self.check_images(images)
        v = self.visual
        x = v.conv1(images.to(v.conv1.weight.dtype))  # [B, C, G, G]
        x = x.flatten(2).transpose(1, 2)  # [B, L, C], row-major grid order
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # CLS at index 0
        x = v.ln_pre(x)
        last = self.depth - 1 if need_cls else max(self.layers)
        wanted = set(self.layers)
        taps: dict[int, torch.Tensor] = {}
        for i, block in enumerate(v.transformer.resblocks[: last + 1]):
            x = block(x)
            if i in wanted:
                taps[i] = x[:, 1:].contiguous()
        image_token = None
        if need_cls:
            image_token = F.normalize(v.ln_post(x[:, 0]) @ v.proj, dim=-1)
        return BackboneOutput(tokens=[taps[i] for i in self.layers], cls=image_token)


def _vision_tower(name: str, grid: int, quick_gelu: bool) -> nn.Module:
    """An open_clip VisionTransformer for ``name`` with a G x G grid (random init, or meta tensors)."""
    import open_clip
    from open_clip.transformer import LayerNorm, VisionTransformer

    cfg = open_clip.get_model_config(name)
    vcfg = cfg["vision_cfg"]
    unknown = set(vcfg) - _SUPPORTED_VISION_KEYS
    if unknown:
        raise ValueError(f"{name}: open_clip vision config has unsupported keys {sorted(unknown)}")
    p, width = int(vcfg["patch_size"]), int(vcfg["width"])
    tower = VisionTransformer(
        image_size=grid * p,
        patch_size=p,
        width=width,
        layers=int(vcfg["layers"]),
        heads=width // int(vcfg.get("head_width", 64)),
        mlp_ratio=float(vcfg.get("mlp_ratio", 4.0)),
        output_dim=int(cfg["embed_dim"]),
        act_layer=QuickGELU if quick_gelu else nn.GELU,
        norm_layer=LayerNorm,
    )
    return tower


def native_image_size(name: str) -> int:
    """The image size a CLIP model's open_clip config was trained at (e.g. 336 for ViT-L-14-336)."""
    import open_clip

    return int(open_clip.get_model_config(name)["vision_cfg"]["image_size"])


def patch_size_of(name: str) -> int:
    import open_clip

    return int(open_clip.get_model_config(name)["vision_cfg"]["patch_size"])


def default_quick_gelu(pretrained: str | None, image_size: int, native: int) -> bool:
    """The original's activation choice (SPEC 1.4): QuickGELU only for OpenAI weights at native size."""
    return pretrained == "openai" and image_size == native


@register_backbone(*CLIP_TAGS)
def build_clip(name: str, *, pretrained: str | None, weights: str | None, image_size: int,
               layers: tuple[int, ...], quick_gelu: bool | None, compat: bool) -> ClipViT:
    """Build a CLIP tower on the CPU in float32 (see the module docstring for the options)."""
    if pretrained is not None and pretrained not in CLIP_TAGS[name]:
        raise ValueError(f"{name}: unknown pretrained tag {pretrained!r}; valid tags: "
                         f"{', '.join(CLIP_TAGS[name])} (or None for random init)")
    p = patch_size_of(name)
    grid = int(image_size) // p
    if grid < 1:
        raise ValueError(f"{name}: image_size must be at least the patch size {p}, got {image_size}")
    native = native_image_size(name)
    use_quick = default_quick_gelu(pretrained, int(image_size), native)
    if quick_gelu is not None:
        use_quick = bool(quick_gelu)
    # With weights to load, build on the meta device: random init of a ViT-L alone takes seconds.
    with torch.device("meta" if weights is not None or pretrained is not None else "cpu"):
        visual = _vision_tower(name, grid, use_quick)
    adapt = pos_embed_adapter("positional_embedding", grid)
    if weights is not None:
        load_weights(visual, weights, adapt=adapt)
    elif pretrained is not None:
        import open_clip

        path = open_clip.download_pretrained(open_clip.get_pretrained_cfg(name, pretrained))
        if not path:
            raise ValueError(f"{name}: open_clip could not download the {pretrained!r} weights")
        load_weights(visual, path, source=f"{name}/{pretrained} ({path})", adapt=adapt)
    return ClipViT(name, visual, image_size=int(image_size), layers=layers, quick_gelu=use_quick)
