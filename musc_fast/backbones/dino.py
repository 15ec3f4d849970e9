"""DINO (v1) and DINOv2 ViTs through timm, tapped as the original MuSc taps them (SPEC 1.3, 1.4).

Registered names (timm architecture, pretrained tag):
  dino_vitbase16 (vit_base_patch16_224, 'dino'), dino_vitbase8 (vit_base_patch8_224, 'dino'),
  dinov2_vitb14 (vit_base_patch14_dinov2, 'lvd142m'), dinov2_vitl14 (vit_large_patch14_dinov2, 'lvd142m').

* Weights: ``pretrained`` = the tag above, fetched by timm's hub download; ``None`` = random init;
  ``weights=PATH`` = a local file (timm or original DINO/DINOv2 key names; DINOv2's unused
  ``mask_token`` is dropped).
* Image size: the model is built for G = S // p; a checkpoint's positional embedding is resized from
  its grid to G the way DINO and DINOv2 do it (bicubic with ``scale_factor = (G + 0.1) / g``,
  align_corners=False, no antialias).
* Taps: the output of 0-based block l passed through the final ``norm``, CLS removed (the original
  takes ``get_intermediate_layers`` outputs, which are normed): one [B, G*G, C] per layer.
* Image token (for RsCIN): ``norm(x)[:, 0]`` after the last block, NOT L2-normalised. It comes from
  the same forward pass as the taps (the original runs the network a second time for it).
* ``compat=True`` reproduces the DINO v1 tap offset (SPEC 1.4): the original asks for the last
  n = max(layers) + 1 blocks and indexes that list with l, so layer l really taps block
  depth - 1 - max(layers) + l. This equals block l only when max(layers) == depth - 1 (the scripted
  [2, 5, 8, 11]); e.g. layers [1, 3, 5] tap blocks [7, 9, 11]. DINOv2 has no such offset.
  With ``compat=False`` (default) layer l is always block l.
* Attention: timm's fused path (``F.scaled_dot_product_attention``) is switched on in every block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import IMAGENET_PREPROCESS, Backbone, BackboneOutput, check_layers, register_backbone
from .weights import load_weights, pos_embed_adapter, register_hub_repo

# Positional-embedding resize offset used by DINO v1 and DINOv2's interpolate_pos_encoding.
DINO_POS_OFFSET = 0.1


@dataclass(frozen=True)
class DinoSpec:
    arch: str  # timm architecture name
    tag: str  # the one pretrained tag
    patch: int  # patch size p
    v1: bool  # DINO v1 (tap-offset quirk under compat)


DINO_MODELS: dict[str, DinoSpec] = {
    "dino_vitbase16": DinoSpec("vit_base_patch16_224", "dino", 16, True),
    "dino_vitbase8": DinoSpec("vit_base_patch8_224", "dino", 8, True),
    "dinov2_vitb14": DinoSpec("vit_base_patch14_dinov2", "lvd142m", 14, False),
    "dinov2_vitl14": DinoSpec("vit_large_patch14_dinov2", "lvd142m", 14, False),
}
register_hub_repo(DINO_MODELS, lambda backbone, pretrained:  # timm's repo: one tag per model
                  f"timm/{DINO_MODELS[backbone].arch}.{DINO_MODELS[backbone].tag}")


def compat_tap_blocks(layers: tuple[int, ...], depth: int, v1: bool, compat: bool) -> tuple[int, ...]:
    """The blocks ``layers`` really tap: shifted by depth - 1 - max(layers) for DINO v1 in compat mode."""
    if not (v1 and compat):
        return tuple(layers)
    shift = depth - 1 - max(layers)
    return tuple(layer + shift for layer in layers)


class DinoViT(Backbone):
    """A timm VisionTransformer under ``self.model``; see the module docstring."""

    def __init__(self, name: str, model: nn.Module, *, image_size: int, layers: tuple[int, ...],
                 v1: bool, compat: bool):
        super().__init__()
        if getattr(model, "num_reg_tokens", 0) or model.num_prefix_tokens != 1 or model.no_embed_class:
            raise ValueError(f"{name}: expected a ViT with one CLS token and a CLS positional entry")
        self.model = model
        self.name = name
        self.patch_size = int(model.patch_embed.proj.kernel_size[0])
        self.depth = len(model.blocks)
        self.layers = check_layers(name, layers, self.depth)
        self.embed_dim = int(model.embed_dim)
        self.cls_dim = int(model.embed_dim)
        self.preprocess = IMAGENET_PREPROCESS
        self.image_size = int(image_size)
        self.compat = bool(compat)
        self.tap_blocks = compat_tap_blocks(self.layers, self.depth, v1, compat)
        for block in model.blocks:
            block.attn.fused_attn = True  # SDPA, never the explicit softmax(QK^T) path

    def forward(self, images: torch.Tensor, need_cls: bool = True) -> BackboneOutput:
        """images [B, 3, S, S] -> tokens [[B, G*G, C] per layer], cls [B, C] (or None)."""
        self.check_images(images)
        m = self.model
        proj = m.patch_embed.proj
        x = proj(images.to(proj.weight.dtype)).flatten(2).transpose(1, 2)  # [B, L, C]; the conv floors
        x = m.patch_embed.norm(x)
        cls = m.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + m.pos_embed.to(x.dtype)  # CLS at index 0
        x = m.norm_pre(x)
        last = self.depth - 1 if need_cls else max(self.tap_blocks)
        wanted = set(self.tap_blocks)
        taps: dict[int, torch.Tensor] = {}
        for i, block in enumerate(m.blocks[: last + 1]):
            x = block(x)
            if i in wanted:
                taps[i] = m.norm(x[:, 1:])  # the final norm is per token: CLS can go first
        image_token = m.norm(x[:, 0]) if need_cls else None
        return BackboneOutput(tokens=[taps[i] for i in self.tap_blocks], cls=image_token)


def _timm_model(arch: str, image_size: int | None, pretrained: bool = False) -> nn.Module:
    """timm model without a head; ``image_size=None`` keeps the architecture's native size."""
    import timm

    kwargs = {} if image_size is None else {"img_size": image_size}
    return timm.create_model(arch, pretrained=pretrained, num_classes=0, **kwargs)


@register_backbone(*DINO_MODELS)
def build_dino(name: str, *, pretrained: str | None, weights: str | None, image_size: int,
               layers: tuple[int, ...], quick_gelu: bool | None, compat: bool) -> DinoViT:
    """Build a DINO/DINOv2 ViT on the CPU in float32 (see the module docstring for the options)."""
    spec = DINO_MODELS[name]
    if pretrained is not None and pretrained != spec.tag:
        raise ValueError(f"{name}: unknown pretrained tag {pretrained!r}; valid tags: {spec.tag} "
                         "(or None for random init)")
    if quick_gelu is not None:
        raise ValueError(f"{name}: quick_gelu applies only to CLIP backbones, got quick_gelu={quick_gelu}")
    p = spec.patch
    grid = int(image_size) // p
    if grid < 1:
        raise ValueError(f"{name}: image_size must be at least the patch size {p}, got {image_size}")
    # With weights to load, build on the meta device: random init of a ViT-L alone takes seconds.
    with torch.device("meta" if weights is not None or pretrained is not None else "cpu"):
        model = _timm_model(spec.arch, grid * p)
    adapt = pos_embed_adapter("pos_embed", grid, offset=DINO_POS_OFFSET)
    if weights is not None:
        load_weights(model, weights, adapt=adapt, ignore=("mask_token",))
    elif pretrained is not None:
        # timm's own hub download at the native size; the grid resize is ours (DINO's method).
        source = _timm_model(f"{spec.arch}.{spec.tag}", None, pretrained=True)
        load_weights(model, source.state_dict(), source=f"timm {spec.arch}.{spec.tag}", adapt=adapt)
    return DinoViT(name, model, image_size=int(image_size), layers=layers, v1=spec.v1, compat=compat)
