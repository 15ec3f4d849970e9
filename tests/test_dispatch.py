"""Measured dispatch (musc_fast.engine.dispatch) with fake providers on the CPU, and ``musc-fast tune``.

Fake providers are plain callables that advance a fake clock by their cost (so the timings are exact)
and count their calls; one test uses real sleeps. Run as a script under torchrun, this file is the
2-rank worker of ``test_two_ranks_agree_on_rank_0s_choice``.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from musc_fast.engine import dispatch
from musc_fast.engine.dispatch import (
    Choice,
    DispatchCache,
    DispatchCacheWarning,
    DispatchKey,
    NoCorrectProviderError,
    bucket,
    choose,
    max_error,
)

REPO = Path(__file__).resolve().parents[1]
REF = torch.tensor([[0.5, -0.25, float("-inf")], [0.125, 1.0, 0.75]], dtype=torch.float64)
TOL = 1e-3


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Provider:
    """A fake provider: each call costs ``ms`` on the fake clock and returns ``out`` (or raises)."""

    def __init__(self, clock: FakeClock, ms: float, out: torch.Tensor | None = None, exc: Exception | None = None):
        self.clock, self.ms, self.out, self.exc, self.calls = clock, ms, REF.float() if out is None else out, exc, 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        self.clock.t += self.ms / 1e3
        if self.exc is not None:
            raise self.exc
        return self.out


def key(pass_kind="nearest_similarity", shape=(100, 196, 768), precision="fp16") -> DispatchKey:
    return DispatchKey.for_pass(pass_kind, shape, precision, "cpu")


@pytest.fixture
def cache(tmp_path) -> DispatchCache:
    return DispatchCache(tmp_path / "dispatch.json")


@pytest.fixture(autouse=True)
def _measure_mode(monkeypatch, tmp_path):
    monkeypatch.setenv("MUSC_FAST_DISPATCH", "measure")  # the CPU default is static
    monkeypatch.setenv("MUSC_FAST_CACHE", str(tmp_path / "user_cache"))
    monkeypatch.delenv("MUSC_FAST_MSM", raising=False)


def test_fastest_correct_one_wins_and_is_stored(cache):
    clock = FakeClock()
    cands = {"a": Provider(clock, 3.0), "b": Provider(clock, 1.0), "c": Provider(clock, 2.0)}
    ch = choose(key(), cands, REF, TOL, cache=cache, repeats=4, clock=clock)
    assert ch.winner == "b" and not ch.from_cache and ch.mode == "measure"
    assert ch.ms == pytest.approx({"a": 3.0, "b": 1.0, "c": 2.0})
    assert all(e < 1e-7 for e in ch.error.values()) and ch.excluded == {}
    assert [p.calls for p in cands.values()] == [5, 5, 5]  # one checked call + 4 timed
    stored = json.loads(cache.path.read_text())["entries"][key().as_str()]
    assert stored["winner"] == "b" and stored["key"]["precision"] == "fp16"


def test_equal_times_go_to_the_earlier_candidate(cache):
    clock = FakeClock()
    ch = choose(key(), {"x": Provider(clock, 1.0), "y": Provider(clock, 1.0)}, REF, TOL, cache=cache, clock=clock)
    assert ch.winner == "x"


def test_a_wrong_one_is_never_chosen_even_if_fastest(cache):
    clock = FakeClock()
    off = REF.float().clone()
    off[1, 1] += 2 * TOL
    cands = {"wrong": Provider(clock, 0.1, off), "right": Provider(clock, 5.0),
             "nan": Provider(clock, 0.1, torch.full_like(REF, float("nan")).float()),
             "no_inf": Provider(clock, 0.1, REF.nan_to_num(neginf=-1.0).float()),  # self entry filled in
             "shape": Provider(clock, 0.1, REF.float()[:1])}
    ch = choose(key(), cands, REF, TOL, cache=cache, clock=clock)
    assert ch.winner == "right"
    assert set(ch.excluded) == {"wrong", "nan", "no_inf", "shape"} and set(ch.ms) == {"right"}
    assert "max error 0.002 > 0.001" in ch.excluded["wrong"] and ch.excluded["shape"] == "wrong shape"
    assert ch.error["wrong"] == pytest.approx(2 * TOL, rel=1e-4) and math.isinf(ch.error["nan"])
    assert cands["wrong"].calls == 1  # checked once, never timed
    back = choose(key(), cands, REF, TOL, cache=DispatchCache(cache.path), clock=clock)
    assert back.from_cache and back.winner == "right" and back.excluded == ch.excluded
    assert math.isinf(back.error["nan"]) and back.error["wrong"] == ch.error["wrong"]


def test_one_that_raises_is_excluded_with_its_reason(cache):
    clock = FakeClock()
    cands = {"boom": Provider(clock, 0.1, exc=RuntimeError("no kernel image for sm_75")), "ok": Provider(clock, 9.0)}
    ch = choose(key(), cands, REF, TOL, cache=cache, clock=clock)
    assert ch.winner == "ok"
    assert ch.excluded == {"boom": "raised RuntimeError: no kernel image for sm_75"}


def test_no_correct_candidate_raises_and_stores_nothing(cache):
    clock = FakeClock()
    cands = {"boom": Provider(clock, 1.0, exc=ValueError("x")), "wrong": Provider(clock, 1.0, REF.float() + 1)}
    with pytest.raises(NoCorrectProviderError, match="boom: raised ValueError: x; wrong: max error"):
        choose(key(), cands, REF, TOL, cache=cache, clock=clock)
    assert not cache.path.exists()


def test_the_cache_is_reused_without_running_anything(cache):
    clock = FakeClock()
    first = {"a": Provider(clock, 2.0), "b": Provider(clock, 1.0)}
    choose(key(), first, REF, TOL, cache=cache, clock=clock)
    again = {"a": Provider(clock, 2.0), "b": Provider(clock, 1.0)}
    ch = choose(key(), again, REF, TOL, cache=DispatchCache(cache.path), clock=clock)  # a new process' view
    assert ch.from_cache and ch.winner == "b" and ch.ms == pytest.approx({"a": 2.0, "b": 1.0})
    assert [p.calls for p in again.values()] == [0, 0]
    forced = choose(key(), again, REF, TOL, cache=cache, clock=clock, repeats=1, force=True)
    assert not forced.from_cache and [p.calls for p in again.values()] == [2, 2]


def test_a_cached_winner_that_is_no_longer_a_candidate_is_measured_again(cache):
    clock = FakeClock()
    choose(key(), {"faiss": Provider(clock, 1.0), "torch": Provider(clock, 2.0)}, REF, TOL, cache=cache, clock=clock)
    now = {"torch": Provider(clock, 2.0), "triton": Provider(clock, 3.0)}  # faiss uninstalled since
    ch = choose(key(), now, REF, TOL, cache=cache, clock=clock)
    assert ch.winner == "torch" and not ch.from_cache and now["triton"].calls > 0


def test_the_cache_is_per_key(cache):
    clock = FakeClock()
    choose(key(precision="fp16"), {"a": Provider(clock, 1.0), "b": Provider(clock, 2.0)}, REF, TOL, cache=cache,
           clock=clock)
    other = {"a": Provider(clock, 2.0), "b": Provider(clock, 1.0)}
    ch = choose(key(precision="bf16"), other, REF, TOL, cache=cache, clock=clock)
    assert ch.winner == "b" and not ch.from_cache and len(cache.load()) == 2


@pytest.mark.parametrize("content", ["{not json", '{"version": 999, "entries": {}}', "[1, 2]",
                                     b"\xff\xfe\x00garbage"])
def test_a_corrupt_cache_file_is_ignored_with_one_warning_and_rewritten(cache, content):
    if isinstance(content, bytes):
        cache.path.write_bytes(content)
    else:
        cache.path.write_text(content)
    clock = FakeClock()
    cands = {"a": Provider(clock, 2.0), "b": Provider(clock, 1.0)}
    with pytest.warns(DispatchCacheWarning, match="ignored") as record:
        ch = choose(key(), cands, REF, TOL, cache=cache, clock=clock)
    assert len(record) == 1 and ch.winner == "b" and cands["b"].calls > 0
    data = json.loads(cache.path.read_text())  # rewritten, valid
    assert data["version"] == dispatch.CACHE_VERSION and data["entries"][key().as_str()]["winner"] == "b"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose(key(), cands, REF, TOL, cache=cache, clock=clock).from_cache


def test_a_malformed_entry_is_measured_again(cache):
    cache.path.write_text(json.dumps({"version": dispatch.CACHE_VERSION,
                                      "entries": {key().as_str(): {"winner": 3, "key": {}}}}))
    clock = FakeClock()
    ch = choose(key(), {"a": Provider(clock, 2.0), "b": Provider(clock, 1.0)}, REF, TOL, cache=cache, clock=clock)
    assert ch.winner == "b" and not ch.from_cache


def test_an_unwritable_cache_warns_but_still_chooses(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cache = DispatchCache(blocker / "dispatch.json")  # its folder is a file: cannot be created
    clock = FakeClock()
    with pytest.warns(DispatchCacheWarning, match="not saved") as record:
        ch = choose(key(), {"a": Provider(clock, 2.0), "b": Provider(clock, 1.0)}, REF, TOL, cache=cache, clock=clock)
    assert ch.winner == "b" and len(record) == 1


def test_static_mode_never_measures_nor_touches_the_cache(cache, monkeypatch):
    monkeypatch.setenv("MUSC_FAST_DISPATCH", "static")
    clock = FakeClock()
    cands = {"torch": Provider(clock, 9.0), "triton": Provider(clock, 1.0), "faiss": Provider(clock, 0.1)}
    ch = choose(key(), cands, REF, TOL, cache=cache, clock=clock, static_choice=["cuDNN", "triton", "torch"])
    assert ch.winner == "triton" and ch.mode == "static" and ch.ms == {} and not ch.from_cache
    assert [p.calls for p in cands.values()] == [0, 0, 0] and not cache.path.exists()
    assert choose(key(), cands, REF, TOL, cache=cache).winner == "torch"  # no order given: the first


def test_auto_mode_measures_on_cuda_only(monkeypatch):
    monkeypatch.delenv("MUSC_FAST_DISPATCH")
    assert dispatch.dispatch_mode("cpu") == "static" and dispatch.dispatch_mode("cuda:0") == "measure"
    monkeypatch.setenv("MUSC_FAST_DISPATCH", " Measure ")
    assert dispatch.dispatch_mode("cpu") == "measure"
    monkeypatch.setenv("MUSC_FAST_DISPATCH", "fastest")
    with pytest.raises(ValueError, match="MUSC_FAST_DISPATCH='fastest' is not one of auto, measure, static"):
        dispatch.dispatch_mode("cpu")


def test_a_single_candidate_is_returned_without_running(cache):
    clock = FakeClock()
    only = Provider(clock, 1.0)
    assert choose(key(), {"torch": only}, REF, TOL, cache=cache, clock=clock).winner == "torch"
    assert only.calls == 0 and not cache.path.exists()
    with pytest.raises(ValueError, match="no candidate"):
        choose(key(), {}, REF, TOL, cache=cache)


def test_real_sleeps_and_the_real_clock(cache):
    import time

    def sleeper(s):
        return lambda: (time.sleep(s), REF)[1]

    ch = choose(key(), {"slow": sleeper(0.03), "fast": sleeper(0.001)}, REF, TOL, cache=cache, repeats=3)
    assert ch.winner == "fast" and ch.ms["slow"] >= 30.0 and ch.ms["fast"] >= 1.0


def test_key_fields_and_buckets():
    assert [bucket(x) for x in (1, 2, 3, 4, 5, 196, 768, 1024, 1025)] == [1, 2, 4, 4, 8, 256, 1024, 1024, 2048]
    with pytest.raises(ValueError):
        bucket(0)
    k = key()
    assert (k.device, k.driver, k.torch, k.n, k.l, k.c) == ("cpu", "-", torch.__version__, 128, 256, 1024)
    assert k.shape_bucket == "N128 L256 C1024"
    assert key(shape=(65, 200, 700)) == k  # the same buckets
    differs = [key(precision="bf16"), key(shape=(129, 196, 768)), key(shape=(100, 257, 768)),
               key(shape=(100, 196, 1025)), key(pass_kind="interval_mean")]
    assert len({k.as_str(), *(d.as_str() for d in differs)}) == 1 + len(differs)


def test_choice_round_trips_through_json():
    ch = Choice(winner="b", ms={"b": 1.5}, error={"b": 1e-7, "a": math.inf}, excluded={"a": "max error inf"},
                tolerance=1e-5)
    back = Choice.from_dict(json.loads(json.dumps(ch.to_dict())), from_cache=True)
    assert back.from_cache and (back.winner, back.ms, back.excluded, back.tolerance) == ("b", ch.ms, ch.excluded, 1e-5)
    assert math.isinf(back.error["a"])


def test_max_error_checks_non_finite_positions():
    assert max_error(REF.float(), REF) < 1e-7
    assert math.isinf(max_error(REF.nan_to_num(neginf=0.0), REF))
    flipped = REF.clone()
    flipped[0, 2] = float("inf")
    assert math.isinf(max_error(flipped, REF))
    assert max_error(torch.full((2,), float("-inf")), torch.full((2,), float("-inf"))) == 0.0


def test_default_cache_lives_in_the_user_cache_folder(tmp_path):
    assert DispatchCache().path == tmp_path / "user_cache" / f"dispatch-v{dispatch.CACHE_VERSION}.json"


# ---- candidates of the real ops ---------------------------------------------------------------------


@pytest.mark.parametrize("n, length, c", [(2, 1, 1), (3, 5, 7), (5, 9, 33)])
def test_candidates_for_match_the_reference(n, length, c):
    from musc_fast.cli_tune import candidates_for, similarity_reference
    from musc_fast.ops.reference import nearest_distances_reference

    gen = torch.Generator().manual_seed(n * 100 + c)
    z = torch.nn.functional.normalize(torch.randn(n, length, c, generator=gen), dim=-1)
    z[-1] = z[0]  # a duplicate image: similarity 1 ties
    cand = candidates_for("nearest_similarity", z, "fp32")
    ref = similarity_reference(z)
    # compared as similarities: sqrt(2 - 2s) would turn fp32 norm rounding of the ties into ~5e-4
    np.testing.assert_allclose(ref.numpy(), 1.0 - nearest_distances_reference(z.numpy()) ** 2 / 2, atol=1e-6)
    assert (ref.diagonal(dim1=0, dim2=2) == float("-inf")).all()
    assert "torch" in cand.calls and cand.static_order[0] == "torch" and cand.tolerance == 1e-5
    assert "triton" in cand.unavailable or "triton" in cand.calls
    for name, call in cand.calls.items():
        assert max_error(call(), ref) <= cand.tolerance, name


def test_candidates_for_respects_a_forced_provider(monkeypatch):
    from musc_fast.cli_tune import candidates_for

    monkeypatch.setenv("MUSC_FAST_MSM", "torch")
    z = torch.nn.functional.normalize(torch.randn(3, 4, 8), dim=-1)
    cand = candidates_for("nearest_similarity", z, "fp16")
    assert list(cand.calls) == ["torch"] and cand.static_order == ["torch"]
    with pytest.raises(ValueError, match="unknown pass kind"):
        candidates_for("lnamd", z, "fp16")


# ---- musc-fast tune ---------------------------------------------------------------------------------

TINY = ["--preset", "offline", "--image-size", "64", "-n", "6", "--device", "cpu", "--repeats", "1"]


def test_tune_help(capsys):
    from musc_fast.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["tune", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for text in ("--preset", "--image-size", "--images", "--precision", "--device", "MUSC_FAST_DISPATCH",
                 "dispatch-v1.json", "float64 reference"):
        assert text in out, text


def test_tune_fills_the_cache_and_prints_the_table(tmp_path, capsys):
    from musc_fast.cli import main

    assert main(["tune", *TINY]) == 0
    out = capsys.readouterr().out
    assert "nearest_similarity" in out and "winner" in out and "N6 L16 C40 (N8 L16 C64)" in out
    assert "C80/112 (N8 L16 C128)" in out  # two layers in one bucket: one decision
    assert "(cached)" not in out
    entries = json.loads((tmp_path / "user_cache" / "dispatch-v1.json").read_text())["entries"]
    assert len(entries) == 2
    for entry in entries.values():
        assert entry["winner"] in entry["ms"] and entry["key"]["device"] == "cpu" and entry["key"]["n"] == 8
        assert all(e <= 1e-5 for e in entry["error"].values())
    assert main(["tune", *TINY]) == 0
    assert capsys.readouterr().out.count("(cached)") == 2


def test_tune_static_mode_measures_nothing(tmp_path, capsys, monkeypatch):
    from musc_fast.cli import main

    monkeypatch.setenv("MUSC_FAST_DISPATCH", "static")
    assert main(["tune", *TINY]) == 0
    out = capsys.readouterr().out
    assert "winner (static order)" in out and "nothing measured" in out
    assert not (tmp_path / "user_cache").exists()


@pytest.mark.parametrize("args, env, message", [
    (["-n", "1"], None, "--images must be >= 2"),
    (["--slice-images", "1"], None, "--slice-images must be >= 2"),
    (["--image-size", "0"], None, "image_size must be positive"),
    (["--device", "cuda:7"], None, "cuda"),
    ([], "often", "MUSC_FAST_DISPATCH='often'"),
])
def test_tune_bad_input_is_one_line_exit_2(capsys, monkeypatch, args, env, message):
    from musc_fast.cli import main

    if env:
        monkeypatch.setenv("MUSC_FAST_DISPATCH", env)
    assert main(["tune", *TINY, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.triton
def test_tune_with_the_triton_interpreter(tmp_path):
    """Under TRITON_INTERPRET=1 the kernel is a candidate too, and meets the bf16 bound."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "MUSC_FAST_CACHE": str(tmp_path), "PYTHONPATH": str(REPO),
           "MUSC_FAST_DISPATCH": "measure", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "musc_fast.cli", "tune", "--preset", "offline", "--image-size", "32", "-n", "3",
           "--device", "cpu", "--repeats", "1", "--precision", "bf16"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    entries = json.loads((tmp_path / "dispatch-v1.json").read_text())["entries"].values()
    assert entries and all("triton" in e["ms"] and e["error"]["triton"] <= 2 * 2.0 ** -8 + 1e-5 for e in entries)


@pytest.mark.gpu
def test_tune_on_cuda_measures_every_provider(tmp_path, capsys, monkeypatch):
    """On a GPU: the key names the GPU and its driver, and every available provider was timed."""
    from musc_fast.cli import main

    monkeypatch.delenv("MUSC_FAST_DISPATCH")  # auto measures on CUDA
    args = ["tune", "--preset", "ViT-B-16", "--image-size", "224", "-n", "64", "--device", "cuda",
            "--precision", "fp16", "--repeats", "3"]
    assert main(args) == 0
    print(capsys.readouterr().out)  # the table, in the GPU check's log
    (entry,) = json.loads((tmp_path / "user_cache" / "dispatch-v1.json").read_text())["entries"].values()
    assert entry["key"]["device"] == torch.cuda.get_device_name() and entry["key"]["driver"] != "-"
    assert "torch" in entry["ms"] and entry["winner"] in entry["ms"]
    assert all(e <= dispatch.SIMILARITY_ERROR_BOUND["fp16"] for e in entry["error"].values())


# ---- torch.distributed: rank 0 decides ----------------------------------------------------------------


def test_two_ranks_agree_on_rank_0s_choice(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MUSC_FAST_DISPATCH": "measure"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__).resolve()), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [g["winner"] for g in got] == ["b", "b"]  # rank 1's own providers would pick "a"
    assert got[0]["calls"] == {"a": 2, "b": 2} and got[1]["calls"] == {"a": 0, "b": 0}
    assert (tmp_path / "cache0.json").exists() and not (tmp_path / "cache1.json").exists()
    assert got[0]["cached"] and got[1]["cached"]  # the second call: from rank 0's cache on both


def _worker(out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    clock = FakeClock()
    costs = {"a": 2.0, "b": 1.0} if rank == 0 else {"a": 1.0, "b": 2.0}
    cands = {n: Provider(clock, ms) for n, ms in costs.items()}
    cache = DispatchCache(out / f"cache{rank}.json")
    ch = choose(key(), cands, REF, TOL, cache=cache, repeats=1, clock=clock)
    again = choose(key(), cands, REF, TOL, cache=cache, repeats=1, clock=clock)
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"winner": ch.winner, "calls": {n: p.calls for n, p in cands.items()}, "cached": again.from_cache}))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
