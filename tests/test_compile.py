"""torch.compile of the backbone (MuScConfig.compile): compiled once, warmed up outside the timed backbone
stage (once per batch size), same results. torch.compile is replaced by a recording stand-in here (a real
compile takes minutes on 2 cores); the real path is exercised by `bench/bench_e2e.py` runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tests.fakes  # noqa: F401  (registers tiny_test)
from musc_fast import MuSc, MuScConfig


def _config(**kw):
    return MuScConfig(backbone="tiny_test", pretrained=None, image_size=32, layers=(0, 2), batch_size=4,
                      device="cpu", **kw)


def test_compiled_backbone_is_warmed_up_apart_with_identical_results(monkeypatch):
    calls = []

    def fake_compile(model, mode=None):
        calls.append(mode)
        seen = []

        def forward(x, **kw):
            seen.append(x.shape[0])
            return model(x, **kw)

        forward.seen = seen
        return forward

    monkeypatch.setattr(torch, "compile", fake_compile)
    images = torch.rand(10, 3, 32, 32)
    plain = MuSc(_config()).score(images, progress=False)
    model = MuSc(_config(compile="reduce-overhead"))
    res = model.score(images, progress=False)
    assert calls == ["reduce-overhead"]
    # warm-up ran batch sizes 4 and 2 (10 = 4 + 4 + 2) once, before the timed pass
    assert model.forward.seen == [2, 4, 4, 4, 2]
    assert "compile" in res.timings and "compile" not in res.ms_per_image()
    np.testing.assert_array_equal(res.patch_scores, plain.patch_scores)
    again = model.score(images, progress=False)  # nothing left to compile
    assert model.forward.seen[5:] == [4, 4, 2]
    np.testing.assert_array_equal(again.patch_scores, plain.patch_scores)


def test_compile_mode_is_validated():
    with pytest.raises(ValueError, match="compile must be one of"):
        _config(compile="fast")
