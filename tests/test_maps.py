"""Maps: bilinear align_corners=True upsampling vs the reference, and golden maps/image scores exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from musc_fast.ops import maps_and_image_scores, upsample_maps
from musc_fast.ops.reference import upsample_reference


@pytest.mark.parametrize("g, s", [(7, 30), (14, 224), (5, 5), (37, 100)])
def test_upsample_equals_reference(g, s):
    patch = np.random.default_rng().random((3, g, g))
    out = upsample_maps(torch.from_numpy(patch), s).numpy()
    np.testing.assert_allclose(out, upsample_reference(patch, s), rtol=0, atol=1e-12)
    # align_corners=True puts the corner grid nodes exactly on the corner pixels.
    np.testing.assert_array_equal(out[:, 0, 0], patch[:, 0, 0])
    np.testing.assert_array_equal(out[:, -1, -1], patch[:, -1, -1])


def test_golden_maps_and_scores_from_stored_patch_scores(golden):
    g = golden("golden_pipeline")
    patch = torch.from_numpy(g["patch_scores"]).view(24, 14, 14)
    maps, scores = maps_and_image_scores(patch, 224, chunk=5)
    assert maps.dtype == torch.float32 and scores.dtype == torch.float64
    np.testing.assert_allclose(maps.numpy(), g["anomaly_maps"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(scores.numpy(), g["image_scores"], rtol=0, atol=1e-12)
    # The image score is the max of the upsampled map, strictly below the grid max here (SPEC 4).
    assert (scores.numpy() < g["patch_scores"].max(1)).all()
