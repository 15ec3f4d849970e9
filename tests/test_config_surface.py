"""Issue 12 item 7: one configuration surface. The flags and YAML keys of `run` and `bank build` are made
from the ``MuScConfig`` fields (``config.add_config_arguments``); every field reaches the config both ways
(or is on the documented ``NOT_EXPOSED`` list); unknown setting names are one line naming the nearest
valid one; ``--aligned-window`` / ``aligned_window:`` work on `run` and give the Python API's scores."""
from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest

import tests.fakes  # noqa: F401  (registers tiny_test)
from musc_fast import MuSc
from musc_fast.cli import build_parser, config_from_settings, main, merged_settings
from musc_fast.cli_bank import _build_config
from musc_fast.config import (
    COMMANDS,
    NOT_EXPOSED,
    MuScConfig,
    UnknownSettingError,
    field_names,
    flag_name,
    rscin_k_for,
)
from musc_fast.data import generate_synthetic

# A valid value other than the paper preset's for every field: a new field fails the first test until it
# is given one here (and so is exposed, or listed in NOT_EXPOSED with its reason).
SAMPLE = {
    "backbone": "tiny_test", "pretrained": None, "weights": "local.safetensors", "image_size": 64,
    "layers": [0, 2], "r_list": [1, 3], "topmin": [0.1, 0.5], "rscin_k": [0], "batch_size": 3,
    "divide_num": 2, "device": "cpu", "precision": "bf16", "msm_precision": "fp16", "compat": True,
    "quick_gelu": True, "aligned_window": 2, "compile": "default", "mask_threshold": 7, "runtime": "onnxruntime",
}
# The command line spelling of a SAMPLE value where it is not the value's own words.
WORDS = {"pretrained": ["none"], "compat": [], "quick_gelu": ["true"]}
BANK_BASE = ["bank", "build", "--out", "b.safetensors", "img.png"]
RUN_BASE = ["run", "--dataset", "mvtec", "--data-path", "."]


def _words(name):
    value = SAMPLE[name]
    if name in WORDS:
        return WORDS[name]
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _config_from(command, argv):
    args = build_parser().parse_args(argv)
    return config_from_settings(merged_settings(args)) if command == "run" else _build_config(args)


def _base(command):
    return RUN_BASE if command == "run" else BANK_BASE


def _as_field(value):
    return tuple(value) if isinstance(value, list) else value


def test_sample_covers_every_field():
    assert list(SAMPLE) == field_names()
    paper = MuScConfig.preset("paper")
    for name, value in SAMPLE.items():
        assert _as_field(value) != getattr(paper, name), name  # else the tests below would prove nothing


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", field_names())
def test_every_field_has_a_flag_and_a_yaml_key(command, name, tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(json.dumps({name: SAMPLE[name]}))  # JSON is YAML
    flag_argv = [*_base(command), flag_name(name), *_words(name)]
    yaml_argv = [*_base(command), "--config", str(yaml_file)]
    if name in NOT_EXPOSED[command]:
        assert len(NOT_EXPOSED[command][name]) > 20  # the reason, in words
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(flag_argv)
        assert exc.value.code == 2
        with pytest.raises(UnknownSettingError, match=f"'{name}' is not a `{command}` setting: "):
            _config_from(command, yaml_argv)
        return
    want = _as_field(SAMPLE[name])
    assert getattr(_config_from(command, flag_argv), name) == want
    assert getattr(_config_from(command, yaml_argv), name) == want


def test_not_exposed_lists_only_fields_with_reasons():
    assert set(NOT_EXPOSED) == set(COMMANDS)
    for command, skipped in NOT_EXPOSED.items():
        assert set(skipped) <= set(field_names()), command
        assert all(reason.strip() for reason in skipped.values())


def test_every_field_has_help():
    for f in dataclasses.fields(MuScConfig):
        assert f.metadata["flag"].help.strip(), f.name


def test_flags_that_were_not_given_keep_the_preset():
    for command in COMMANDS:
        got = _config_from(command, [*_base(command), "--backbone", "ViT-B-16"])
        want = MuScConfig.preset("ViT-B-16")
        if command == "run":  # the data set's RsCIN windows
            want = dataclasses.replace(want, rscin_k=rscin_k_for("mvtec"))
        assert got == want, command


def test_none_values_given_on_the_command_line():
    for command in COMMANDS:
        got = _config_from(command, [*_base(command), "--pretrained", "none", "--quick-gelu", "false"])
        assert got.pretrained is None and got.quick_gelu is False
    got = _config_from("run", [*RUN_BASE, "--mask-threshold", "original"])
    assert got.mask_threshold is None


def test_bad_bool_word_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*RUN_BASE, "--quick-gelu", "maybe"])
    assert exc.value.code == 2 and "expected true or false, got 'maybe'" in capsys.readouterr().err


# --- unknown names -------------------------------------------------------------------------------------
def test_unknown_keyword_names_the_nearest_field():
    line = "unknown setting 'feature_layers'; did you mean 'layers'?"
    for make in (lambda: MuScConfig(feature_layers=(1,)), lambda: MuScConfig.preset("offline", feature_layers=(1,)),
                 lambda: MuScConfig.from_dict({"feature_layers": [1]}),
                 lambda: dataclasses.replace(MuScConfig(), feature_layers=(1,))):
        with pytest.raises(ValueError) as exc:
            make()
        assert str(exc.value) == line
        assert isinstance(exc.value, TypeError)  # what a dataclass raised before: old handlers still catch it
    with pytest.raises(ValueError, match=r"^unknown setting 'windw'; did you mean 'aligned_window'\?$"):
        MuScConfig(windw=2)
    with pytest.raises(ValueError, match=r"^unknown setting 'img_resize'; did you mean 'image_size'\?$"):
        MuScConfig(img_resize=224)  # the original MuSc's name
    with pytest.raises(ValueError, match=r"^unknown setting 'zzz'; valid settings: aligned_window, backbone, "):
        MuScConfig(zzz=1)
    with pytest.raises(ValueError, match=r"did you mean 'batch_size'\? \(and 1 more: 'zzz'\)$"):
        MuScConfig(batchsize=1, zzz=1)


def test_unknown_yaml_key_in_from_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("r_list: [1, 3]\nrlist: [1]\n")
    with pytest.raises(ValueError, match=r"c.yaml: unknown setting 'rlist'; did you mean 'r_list'\?$"):
        MuScConfig.from_yaml(str(cfg))


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_yaml_key_from_the_cli_is_one_line_exit_2(command, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("feature_layers: [0, 2]\n")
    argv = ([*RUN_BASE, "--out", str(tmp_path / "o")] if command == "run"
            else ["bank", "build", "--out", str(tmp_path / "b.safetensors"), str(tmp_path)])
    assert main([*argv, "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.endswith("c.yaml: unknown setting 'feature_layers'; did you mean 'layers'?"), err
    assert not (tmp_path / "o").exists() and not (tmp_path / "b.safetensors").exists()


def test_run_only_key_suggested_in_run_yaml(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("class_name: bottle\n")  # the original's name of `category`
    assert main([*RUN_BASE, "--config", str(cfg)]) == 2
    assert "unknown setting 'class_name'; did you mean 'category'?" in capsys.readouterr().err


# --- the aligned window on `run` ---------------------------------------------------------------------
TINY = ["--backbone", "tiny_test", "--pretrained", "none", "--image-size", "64", "--layers", "0", "2",
        "--device", "cpu", "--no-progress", "--num-workers", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "data", n_good=4, n_defect=4, n_train=0, size=64)


def _cli_scores(out):
    (root,) = out.glob("synthetic/tiny_test/imagesize64")
    with open(root / "object" / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    config = json.loads((root / "results.json").read_text())["config"]
    return {r["path"]: (float(r["raw_score"]), float(r["score"])) for r in rows}, config


def test_aligned_window_on_run_changes_scores_and_matches_the_python_api(tmp_path, data, capsys):
    base = ["run", "--dataset", "synthetic", "--data-path", str(data), "--category", "object", *TINY]
    assert main([*base, "--out", str(tmp_path / "full")]) == 0, capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "w2"), "--aligned-window", "2"]) == 0, capsys.readouterr().err
    cfg = tmp_path / "w.yaml"
    cfg.write_text("aligned_window: 2\n")
    assert main([*base, "--out", str(tmp_path / "yaml"), "--config", str(cfg)]) == 0, capsys.readouterr().err
    full, full_cfg = _cli_scores(tmp_path / "full")
    win, win_cfg = _cli_scores(tmp_path / "w2")
    from_yaml, yaml_cfg = _cli_scores(tmp_path / "yaml")
    assert full_cfg["aligned_window"] is None and win_cfg["aligned_window"] == yaml_cfg["aligned_window"] == 2
    assert from_yaml == win  # the YAML key and the flag: the same run
    paths = list(win)  # the category's order, as the run scored them
    raw_full = np.array([full[p][0] for p in paths])
    raw_win = np.array([win[p][0] for p in paths])
    # a smaller search space can only raise each patch's distance: the raw (max-of-map) scores too
    assert np.all(raw_win >= raw_full - 1e-6) and np.abs(raw_win - raw_full).max() > 1e-3
    # the Python API with the same settings, built without the CLI
    config = MuScConfig.preset("paper", backbone="tiny_test", pretrained=None, image_size=64, layers=(0, 2),
                               device="cpu", rscin_k=rscin_k_for("synthetic"), aligned_window=2)
    res = MuSc(config, num_workers=0).score(paths, progress=False)
    # scores.csv holds 10 significant digits
    np.testing.assert_allclose(raw_win, res.raw_image_scores, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose([win[p][1] for p in paths], res.image_scores, rtol=1e-8, atol=1e-9)


def test_bank_build_yaml_reaches_the_bank_file(tmp_path, data, capsys):
    from musc_fast.bank import Bank

    images = sorted((data / "object" / "test" / "good").glob("*.png"))
    assert len(images) >= 3
    cfg = tmp_path / "bank.yaml"
    cfg.write_text("backbone: tiny_test\npretrained: none\nimage_size: 64\nlayers: [0, 2]\nr_list: [1, 3]\n"
                   "device: cpu\naligned_window: 1\nmax_size: 3\n")
    out = tmp_path / "b.safetensors"
    code = main(["bank", "build", "--out", str(out), *map(str, images), "--config", str(cfg), "--no-progress",
                 "--r-list", "1"])
    assert code == 0, capsys.readouterr().err
    bank = Bank.load(out)
    c = bank.config
    assert (c.backbone, c.pretrained, c.image_size, c.layers, c.aligned_window) == ("tiny_test", None, 64, (0, 2), 1)
    assert c.r_list == (1,) and len(bank) == 3  # the flag over the file; max_size from the file
