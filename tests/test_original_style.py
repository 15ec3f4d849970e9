"""The benchmarks' baseline (bench/original_style.py) really computes what the original computes."""
from __future__ import annotations

import numpy as np
import torch

from bench.original_style import image_scores_original, patch_scores_original


def test_baseline_reproduces_the_golden_pipeline(golden):
    g = golden("golden_pipeline")
    layers = [torch.from_numpy(g["tokens"][layer][:, 1:]) for layer in range(4)]
    patch = patch_scores_original(layers, [1, 3, 5], "cpu")
    np.testing.assert_allclose(patch.numpy(), g["patch_scores"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(image_scores_original(patch, 224, "cpu"), g["image_scores"], rtol=0, atol=2e-5)
