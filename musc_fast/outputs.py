"""Result files: every write is atomic (temporary file in the same folder, then rename), so a crash or a
full disk never leaves a half-written results file behind.

Layout under ``<out>/<dataset>/<backbone>/imagesize<S>/`` (the original's root, SPEC 8.2):
    results.csv, results.json      per category + mean, metrics x100 (the original's scale), same numbers
    results.xlsx                   like the original's (sheet "MuSc_results", pixel metrics first), on request
    <category>/scores.csv          per image: path, label, raw score, RsCIN score
    <category>/result.json         the category's metrics, timings and config (written when it finishes)
    <category>/<vis>/...           heat maps (see viz.py)
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import secrets
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

METRIC_COLUMNS = ("auroc_sp", "f1_sp", "ap_sp", "auroc_px", "f1_px", "ap_px", "aupro", "aupro_mvtec")
# The original's xlsx column order (SPEC 8.2): pixel metrics first.
XLSX_COLUMNS = ("auroc_px", "f1_px", "ap_px", "aupro", "auroc_sp", "f1_sp", "ap_sp")


class OutputError(OSError):
    """A result file could not be written (disk full, permissions). One line: the path and the reason."""


def run_root(out: str | Path, dataset: str, backbone: str, image_size: int) -> Path:
    return Path(out) / safe_component(dataset) / safe_component(backbone) / f"imagesize{int(image_size)}"


def safe_component(name: str) -> str:
    """A single path component derived from input names that cannot escape the output folder: only
    letters, digits, "-", "_" and inner "." survive (everything else becomes "_"), so "/", "\\" and
    ".." cannot occur; an empty result becomes "_"."""
    cleaned = "".join(c if (c.isalnum() or c in "-_.") else "_" for c in str(name)).strip(".")
    return cleaned or "_"


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """Output file stems for input files (``safe_component`` of the stem), made unique: when several
    inputs map to the same stem (a.png and a.jpg, or names that differ only in replaced characters),
    each gets its extension appended, then a counter."""
    stems = [safe_component(Path(p).stem) for p in paths]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    out: list[str] = []
    taken: set[str] = set()
    for p, s in zip(paths, stems):
        name = s if counts[s] == 1 else safe_component(f"{s}_{Path(p).suffix.lstrip('.')}")
        base, k = name, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        out.append(name)
    return out


def _write_all(fd: int, data: bytes) -> None:
    # os.write may write less than asked (signals, pipes); loop until done. Raises OSError (e.g. ENOSPC).
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def create_temp(path: str | Path) -> tuple[int, Path]:
    """A new, empty temporary file beside ``path`` (``.<name>.<random>.tmp``), opened for writing:
    (fd, its path). Created with mode 0o666 so that the umask applies, as for any ordinary file
    (``tempfile.mkstemp`` would make it 0600, and the rename would keep that)."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: no free temporary name")


@contextmanager
def _replacing(path: Path):
    """Yield ``(fd, tmp)``, a new temporary file beside ``path`` (the body closes ``fd``), and rename it over
    ``path`` when the body returns. On any error the temporary file is removed; an OSError (disk full,
    permissions) becomes a one-line ``OutputError`` naming ``path``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = create_temp(path)
        try:
            yield fd, tmp
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync, then ``os.replace``:
    readers see the old file or the new one, never a part. Any OSError (disk full, permissions) becomes
    a one-line ``OutputError`` naming ``path``, and the temporary file is removed."""
    with _replacing(Path(path)) as (fd, _tmp):
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


def write_file_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write_bytes_atomic`` for writers that want a file name (a library's ``save(filename)``):
    ``write(tmp)`` fills a temporary file beside ``path``, which then gets the mode a new file gets
    under the umask (such writers may create it 0600), is fsynced and renamed over ``path``. Any
    OSError, raised by ``write`` too, becomes a one-line ``OutputError``; the temporary file is removed."""
    with _replacing(Path(path)) as (fd, tmp):
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0o666 less the umask, as create_temp made it
        finally:
            os.close(fd)
        write(tmp)
        os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicBatch:
    """Many files written atomically with the syncs batched: ``add`` writes each to a temporary file
    (no fsync), leaving the block fsyncs them all, then renames them; an error anywhere removes every
    temporary file and becomes one ``OutputError``. Each file is still old-or-new; the syncs come after
    all the writes, so the disk flushes them together instead of once per file. Use as
    ``with AtomicBatch() as batch: batch.add(path, data)``."""

    def __init__(self) -> None:
        self._todo: list[tuple[Path, Path]] = []

    def add(self, path: str | Path, data: bytes) -> None:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = create_temp(path)
            self._todo.append((tmp, path))
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            self._discard()
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc

    def add_png(self, path: str | Path, image) -> None:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        self.add(path, buf.getvalue())

    def commit(self) -> None:
        path = None
        try:
            for tmp, path in self._todo:  # noqa: B007 (path names the file in the error)
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            for tmp, path in self._todo:
                os.replace(tmp, path)
        except OSError as exc:
            self._discard()
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
        self._todo = []

    def _discard(self) -> None:
        for tmp, _ in self._todo:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        self._todo = []

    def __enter__(self) -> "AtomicBatch":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self._discard()


def remove_file(path: str | Path) -> None:
    """Delete ``path`` if it exists (OutputError if that fails)."""
    try:
        Path(path).unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError(f"{path}: cannot remove ({exc.strerror or exc})") from exc


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow(["" if _missing(v) else v for v in row])
    write_text_atomic(path, buf.getvalue())


def write_png(path: str | Path, image) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _jsonable(obj: Any) -> Any:
    """NaN -> None (JSON has no NaN), numpy scalars -> Python numbers, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def as_percent(metrics: dict[str, float | None]) -> dict[str, float | None]:
    """Metrics in [0, 1] -> x100 (the original's scale); missing stays missing."""
    return {k: (None if _missing(v) else 100.0 * float(v)) for k, v in metrics.items()}


def mean_row(per_category: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    """Unweighted mean over categories of each metric, skipping missing values (None when all missing)."""
    out: dict[str, float | None] = {}
    for col in METRIC_COLUMNS:
        vals = [v[col] for v in per_category.values() if not _missing(v.get(col))]
        out[col] = sum(vals) / len(vals) if vals else None
    return out


def write_results(root: Path, per_category: dict[str, dict[str, Any]], extra: dict[str, Any],
                  save_xlsx: bool = False) -> None:
    """results.csv / results.json (/ results.xlsx) for the categories finished so far, merged under a
    lock with the categories an earlier or concurrent run left in ``root`` (``merged_categories``).

    Args:
        per_category: category -> {"metrics": {col: x100 or None}, "timings_ms_per_image": {...}, ...}.
        extra: run-level fields for the JSON (config, versions, failures).
    """
    with results_lock(root):
        _write_results(root, merged_categories(root, per_category), extra, save_xlsx)


def _write_results(root: Path, per_category: dict[str, dict[str, Any]], extra: dict[str, Any],
                   save_xlsx: bool) -> None:
    metrics = {c: v["metrics"] for c, v in per_category.items()}
    mean = mean_row(metrics)
    rows = [[c, *[m.get(col) for col in METRIC_COLUMNS]] for c, m in metrics.items()]
    rows.append(["mean", *[mean[col] for col in METRIC_COLUMNS]])
    write_csv(root / "results.csv", ["category", *METRIC_COLUMNS], rows)
    write_json(root / "results.json", {**extra, "categories": per_category, "mean": mean})
    if save_xlsx:
        write_xlsx(root / "results.xlsx", metrics, mean)


@contextmanager
def results_lock(root: Path, timeout_s: float = 60.0) -> Iterator[None]:
    """Hold ``<root>/.results.lock`` (fcntl.flock; no lock where fcntl is missing) while results are
    merged and written, so that two runs into one folder never drop each other's categories. Waits up
    to ``timeout_s`` for another writer, then OutputError (one line)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path = Path(root) / ".results.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise OutputError(f"{path}: another musc-fast run has been writing results here for "
                                      f"{timeout_s:.0f} s; try again when it is done") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def merged_categories(root: Path, per_category: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """This run's categories merged into those of the ``results.json`` already in ``root``: an earlier
    category is kept (in its place) while its folder still holds its ``result.json``; a category of
    this run replaces the earlier row of the same name."""
    try:
        earlier = json.loads((Path(root) / "results.json").read_text(encoding="utf-8")).get("categories", {})
    except (OSError, ValueError, AttributeError):
        earlier = {}
    if not isinstance(earlier, dict):
        earlier = {}
    out = {c: v for c, v in earlier.items() if isinstance(v, dict) and "metrics" in v
           and (Path(root) / safe_component(c) / "result.json").is_file()}
    out.update(per_category)
    return out


def write_xlsx(path: Path, metrics: dict[str, dict[str, float | None]], mean: dict[str, float | None]) -> None:
    """The original's spreadsheet: sheet "MuSc_results", headers in B..H (pixel metrics first), one row
    per category, then "mean"."""
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.title = "MuSc_results"
    ws.append(["", *XLSX_COLUMNS])
    for name, m in [*metrics.items(), ("mean", mean)]:
        ws.append([name, *[m.get(col) for col in XLSX_COLUMNS]])
    buf = io.BytesIO()
    wb.save(buf)
    write_bytes_atomic(path, buf.getvalue())


def format_table(per_category: dict[str, dict[str, float | None]], columns: Sequence[str] = METRIC_COLUMNS) -> str:
    """A plain-text table of x100 metrics with a mean row, for the terminal."""
    mean = mean_row(per_category)
    names = [*per_category, "mean"]
    width = max(8, *(len(n) for n in names))
    lines = [f"{'category':<{width}} " + " ".join(f"{c:>11}" for c in columns)]
    for name in names:
        m = per_category.get(name, mean)
        cells = ("-" if _missing(m.get(c)) else f"{m[c]:.2f}" for c in columns)
        lines.append(f"{name:<{width}} " + " ".join(f"{v:>11}" for v in cells))
    return "\n".join(lines)
