"""The post-backbone pipeline (score_features) against the original's golden run, and its contracts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from musc_fast import Result, score_features
from musc_fast.ops import lnamd, mutual_scores
from tests.helpers import unit_rows


@pytest.fixture(scope="module")
def pipeline_golden():
    from tests.conftest import shared_path

    return dict(np.load(shared_path("golden", "golden_pipeline.npz")))


def _layers(g):
    # (layer, image, 1+L, C) fp16 with CLS at index 0 -> list of [N, L, C]
    return [torch.from_numpy(g["tokens"][layer][:, 1:]) for layer in range(g["tokens"].shape[0])]


def test_golden_per_pass_maps(pipeline_golden):
    """Each (r, layer) MSM map of the golden run, from its tokens (batching does not matter)."""
    g = pipeline_golden
    layers = _layers(g)
    for ri, r in enumerate(g["r_list"]):
        for li, tokens in enumerate(layers):
            out = mutual_scores(lnamd(tokens, int(r)))
            np.testing.assert_allclose(out.numpy(), g["msm_maps"][ri, li], rtol=0, atol=2e-5)


def test_golden_pipeline(pipeline_golden):
    g = pipeline_golden
    res = score_features(_layers(g), g["cls_tokens"], image_size=224, r_list=tuple(g["r_list"]),
                         rscin_k=tuple(g["k_list"]))
    assert isinstance(res, Result) and len(res) == 24
    assert res.patch_scores.shape == (24, 14, 14) and res.patch_scores.dtype == np.float64
    assert res.anomaly_maps.shape == (24, 224, 224) and res.anomaly_maps.dtype == np.float32
    np.testing.assert_allclose(res.patch_scores.reshape(24, -1), g["patch_scores"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(res.anomaly_maps, g["anomaly_maps"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(res.raw_image_scores, g["image_scores"], rtol=0, atol=2e-5)
    tie = g["rscin_tie"].any(0)  # rows where the original's tie-breaking decided (checked in test_rscin)
    np.testing.assert_allclose(res.image_scores[~tie], g["rscin_scores"][~tie], rtol=0, atol=1e-4)
    assert set(res.timings) >= {"lnamd", "msm", "maps", "rscin"}
    assert all(v >= 0 for v in res.ms_per_image().values())


def test_subsets_score_separately():
    rng = np.random.default_rng()
    layers = [torch.from_numpy(rng.standard_normal((10, 49, 12)).astype(np.float32)) for _ in range(2)]
    subsets = [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    res = score_features(layers, None, image_size=28, r_list=(1, 3), subsets=subsets)
    for idx in subsets:
        alone = score_features([t[idx] for t in layers], None, image_size=28, r_list=(1, 3))
        np.testing.assert_allclose(res.patch_scores[idx], alone.patch_scores, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(res.image_scores, res.raw_image_scores)  # no cls tokens: no RsCIN
    with pytest.raises(ValueError, match="partition"):
        score_features(layers, None, image_size=28, subsets=[[0, 1], [1, 2]])


def test_input_validation():
    z = torch.from_numpy(unit_rows(4, 49, 8, np.random.default_rng()))
    with pytest.raises(ValueError, match="at least 2"):
        score_features([z[:1]], None, image_size=14)
    with pytest.raises(ValueError, match="every layer"):
        score_features([z, z[:, :25]], None, image_size=14)
    with pytest.raises(ValueError, match="square"):
        score_features([z[:, :48]], None, image_size=14)
    with pytest.raises(ValueError, match="at least one layer"):
        score_features([], None, image_size=14)
