"""musc_fast as an anomalib 2.7 model: Engine.test, the `anomalib test` CLI, and the few-shot bank.

Parity: the raw scores equal musc_fast's own on the same paths (1e-6), anomalib's AUROCs equal ours
(1e-6; anomalib's pred_score is squashed by a strictly increasing map, which keeps every ranking).
Image size 128 keeps CI short (the offline preset is 256).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, shared_path

pytest.importorskip("anomalib", reason="the anomalib extra is not installed")
pytestmark = pytest.mark.slow

SIZE = 128
DEFECTS = ["broken_large", "broken_small", "contamination"]


def _config():
    from musc_fast import MuScConfig

    return MuScConfig.preset("offline", image_size=SIZE, device="cpu")


def _bottle_datamodule():
    from anomalib.data import Folder

    root = shared_path("datasets", "mvtec_bottle", "bottle")
    return Folder(name="bottle", root=root, normal_dir="train/good", abnormal_dir=[f"test/{d}" for d in DEFECTS],
                  normal_test_dir="test/good", val_split_mode="none", num_workers=0, eval_batch_size=16)


class Grab:
    """A callback keeping what anomalib's evaluator saw, per image path."""

    def __new__(cls):
        from lightning.pytorch import Callback

        class _Grab(Callback):
            def __init__(self):
                self.score, self.label = {}, {}

            def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
                for p, s, y in zip(outputs.image_path, outputs.pred_score.tolist(), outputs.gt_label.tolist()):
                    self.score[str(p)], self.label[str(p)] = s, y

        return _Grab()


def _engine(tmp_path, grab):
    from anomalib.engine import Engine

    return Engine(callbacks=[grab], default_root_dir=str(tmp_path), accelerator="cpu", devices=1, logger=False)


@pytest.fixture(scope="module")
def bottle_paths():
    from anomalib.data import Folder  # noqa: F401  (skip early without anomalib)

    dm = _bottle_datamodule()
    dm.setup()
    return [str(p) for p in dm.test_data.samples["image_path"]]


def _auroc(labels, scores) -> float:
    from musc_fast.metrics import curve_metrics

    return curve_metrics(np.asarray(labels), np.asarray(scores))[0]


def test_engine_test_bottle_equals_musc_fast(tmp_path, bottle_paths):
    from musc_fast import MuSc as Engine_
    from musc_fast.integrations.anomalib import MuSc, squash

    grab = Grab()
    model = MuSc(preset="offline", image_size=SIZE, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (metrics,) = _engine(tmp_path, grab).test(model, datamodule=_bottle_datamodule())
    scored = model.results[("test", 0)]
    ours = Engine_(_config()).score(bottle_paths, progress=False)
    assert len(grab.score) == len(bottle_paths) == 83
    np.testing.assert_allclose(scored.result.image_scores, ours.image_scores, rtol=0, atol=1e-6)
    np.testing.assert_allclose(scored.result.anomaly_maps, ours.anomaly_maps, rtol=0, atol=1e-6)
    # what anomalib's evaluator saw: the squashed scores, threshold -> 0.5
    t = scored.thresholds.image
    expected = squash(__import__("torch").from_numpy(ours.image_scores), t, abs(t)).numpy()
    got = np.array([grab.score[p] for p in bottle_paths])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    labels = [grab.label[p] for p in bottle_paths]
    assert abs(metrics["image_AUROC"] - _auroc(labels, ours.image_scores)) < 1e-6, metrics
    assert metrics["image_AUROC"] > 0.9
    # anomalib's visualizer wrote a picture per test image
    assert len(list(tmp_path.rglob("images/test/**/*.png"))) == 83


def test_engine_test_magnetic_tile_pixel_auroc(tmp_path):
    from anomalib.data import MVTecAD

    from musc_fast import MuSc as Engine_
    from musc_fast.data import load_category, load_masks
    from musc_fast.integrations.anomalib import MuSc
    from musc_fast.metrics import compute_metrics

    root = shared_path("datasets", "mtd")  # the whole magnetic-tile set (read only; anomalib writes nothing there)
    dm = MVTecAD(root=root, category="magnetic_tile", val_split_mode="none", num_workers=0, eval_batch_size=8)
    grab = Grab()
    model = MuSc(preset="offline", image_size=SIZE, device="cpu", mask_rule="eq1", visualizer=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (metrics,) = _engine(tmp_path / "run", grab).test(model, datamodule=dm)
    paths = [str(p) for p in dm.test_data.samples["image_path"]]
    ours = Engine_(_config()).score(paths, progress=False)
    np.testing.assert_allclose(model.results[("test", 0)].result.image_scores, ours.image_scores, rtol=0, atol=1e-6)
    cat = load_category("mvtec", root, "magnetic_tile")  # our reader on the same files
    # keyed by resolved path: anomalib resolves symlinks (a linked ../shared), our reader keeps the path given
    by_path = {Path(s.path).resolve(): s for s in cat.samples}
    samples = [by_path[Path(p).resolve()] for p in paths]
    masks = load_masks([s.mask_path for s in samples], SIZE, "eq1", progress=False).numpy()
    labels = np.array([s.label for s in samples])
    tests = (root / "magnetic_tile" / "test").iterdir()
    n_defective = sum(len(list(d.glob("*.png"))) for d in tests if d.name != "good")
    assert len(paths) == len(cat.samples) and labels.sum() == n_defective > 0 and masks.any()
    ref = compute_metrics(labels, ours.image_scores, masks, ours.anomaly_maps)
    assert abs(metrics["image_AUROC"] - ref["auroc_sp"]) < 1e-6, (metrics, ref)
    assert abs(metrics["pixel_AUROC"] - ref["auroc_px"]) < 1e-6, (metrics, ref)
    assert metrics["pixel_AUROC"] > 0.6


def test_anomalib_cli_test(tmp_path, bottle_paths):
    from musc_fast import MuSc as Engine_

    root = shared_path("datasets", "mvtec_bottle", "bottle")
    cmd = [sys.executable, "-m", "anomalib.cli.cli", "test",
           "--model", "musc_fast.integrations.anomalib.MuSc", "--model.preset", "offline",
           "--model.image_size", str(SIZE), "--model.device", "cpu", "--model.visualizer", "false",
           "--data", "anomalib.data.Folder", "--data.name", "bottle", "--data.root", str(root),
           "--data.normal_dir", "train/good", "--data.abnormal_dir", str([f"test/{d}" for d in DEFECTS]),
           "--data.normal_test_dir", "test/good", "--data.val_split_mode", "none", "--data.num_workers", "0",
           "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--default_root_dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"})
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    found = re.search(r"image_AUROC\s*│\s*([0-9.]+)", proc.stdout)
    assert found, proc.stdout[-2000:]
    ours = Engine_(_config()).score(bottle_paths, progress=False)
    labels = [0 if "/good/" in p else 1 for p in bottle_paths]
    assert abs(float(found.group(1)) - _auroc(labels, ours.image_scores)) < 1e-6


def test_bank_few_shot_equals_bank_score(tmp_path, bottle_paths):
    from musc_fast.bank import Bank
    from musc_fast.integrations.anomalib import MuScBank

    grab = Grab()
    model = MuScBank(preset="offline", image_size=SIZE, device="cpu", visualizer=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (metrics,) = _engine(tmp_path, grab).test(model, datamodule=_bottle_datamodule())
    train = sorted(str(p) for p in shared_path("datasets", "mvtec_bottle", "bottle", "train", "good").glob("*.png"))
    assert sorted(str(Path(p).resolve()) for p in model.bank.names) == [str(Path(p).resolve()) for p in train]
    ref = Bank.build(train, _config(), progress=False)
    expected = ref.score(bottle_paths).image_scores
    got = np.concatenate([s.result.image_scores for s in model.results.values()])
    order = [p for s in model.results.values() for p in s.index]
    np.testing.assert_allclose(got, expected[[bottle_paths.index(p) for p in order]], rtol=0, atol=1e-6)
    labels = [grab.label[p] for p in bottle_paths]
    assert abs(metrics["image_AUROC"] - _auroc(labels, expected)) < 1e-6
    # the image threshold is the bank's calibrated one (quantile of its leave-one-out scores)
    assert model.calibrated is not None and model.calibrated.calibrated


def test_engine_predict_on_a_folder(tmp_path):
    from anomalib.engine import Engine

    from musc_fast import MuSc as Engine_
    from musc_fast.integrations.anomalib import MuSc

    folder = shared_path("datasets", "mvtec_bottle", "bottle", "test", "broken_large")
    model = MuSc(preset="offline", image_size=SIZE, device="cpu", visualizer=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = Engine(accelerator="cpu", logger=False, default_root_dir=str(tmp_path)).predict(model, data_path=folder)
    paths = [str(p) for b in out for p in b.image_path]
    raw = model.results[("predict", 0)]
    ours = Engine_(_config()).score(paths, progress=False)
    got = raw.result.image_scores[[raw.index[p] for p in paths]]
    np.testing.assert_allclose(got, ours.image_scores, rtol=0, atol=1e-6)
    scores = np.concatenate([b.pred_score.numpy() for b in out])
    labels = np.concatenate([b.pred_label.numpy() for b in out])
    assert ((scores > 0) & (scores < 1)).all() and (labels == (scores > 0.5)).all()  # anomalib's 0.5 convention
    assert all(b.anomaly_map.shape[-2:] == (SIZE, SIZE) for b in out)


def test_no_anomalib_import_outside_integrations():
    offenders = []
    for path in (REPO / "musc_fast").rglob("*.py"):
        if "integrations" in path.parts:
            continue
        if re.search(r"^\s*(import|from)\s+anomalib\b", path.read_text(encoding="utf-8"), re.M):
            offenders.append(str(path))
    assert not offenders
