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
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

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


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync, then ``os.replace``:
    readers see the old file or the new one, never a part. Any OSError (disk full, permissions) becomes
    a one-line ``OutputError`` naming ``path``, and the temporary file is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc


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
    """results.csv / results.json (/ results.xlsx) for the categories finished so far.

    Args:
        per_category: category -> {"metrics": {col: x100 or None}, "timings_ms_per_image": {...}, ...}.
        extra: run-level fields for the JSON (config, versions, failures).
    """
    metrics = {c: v["metrics"] for c, v in per_category.items()}
    mean = mean_row(metrics)
    rows = [[c, *[m.get(col) for col in METRIC_COLUMNS]] for c, m in metrics.items()]
    rows.append(["mean", *[mean[col] for col in METRIC_COLUMNS]])
    write_csv(root / "results.csv", ["category", *METRIC_COLUMNS], rows)
    write_json(root / "results.json", {**extra, "categories": per_category, "mean": mean})
    if save_xlsx:
        write_xlsx(root / "results.xlsx", metrics, mean)


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
