"""Thresholds: OK/NG labels and binary defect masks from MuSc scores.

* **Image threshold**: a fixed value, or the q-quantile of the bank's leave-one-out image scores
  (every bank image scored against the other M - 1 bank images, which is exactly the batch mutual
  scoring of the bank, ``Bank.leave_one_out``). With a bank of known-good images, q = 1.0 accepts every
  bank image and q = 0.99 lets about 1 % of good images through as NG.
* **Pixel threshold**, for the masks (``anomaly_map > pixel``): by default **the image threshold
  itself**. The image score is the max of the map (RsCIN off), so the mask is non-empty exactly when
  the image is NG, and it marks where the map exceeds the level that made it NG. Alternatively a fixed
  value, or the q-quantile of all pixels of the leave-one-out maps (about a fraction 1 - q of a good
  image's pixels lie above it).
* **Decision**: NG when ``score > threshold`` (a score equal to the threshold is OK).

Calibrated (quantile) thresholds describe raw image scores; they cannot be applied to RsCIN-re-scored
outputs, whose scale depends on the set (``Bank.score(rscin=True)`` refuses them).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .pipeline import Result


def _check_q(q: float, what: str) -> float:
    q = float(q)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {q}")
    return q


@dataclass(frozen=True)
class Threshold:
    """An image-level and a pixel-level threshold.

    Attributes:
        image: NG when the image score is above this.
        pixel: a pixel is defective when its map value is above this.
        source: how they were chosen (printed by the CLI, saved with results).
        calibrated: True when taken from leave-one-out scores (raw-score scale).
    """

    image: float
    pixel: float
    source: str = "fixed"
    calibrated: bool = False

    @classmethod
    def fixed(cls, image: float, pixel: float | None = None) -> "Threshold":
        """Fixed values; the pixel threshold defaults to the image threshold."""
        image = float(image)
        if not np.isfinite(image):
            raise ValueError(f"threshold must be a finite number, got {image}")
        return cls(image=image, pixel=image if pixel is None else float(pixel), source="fixed")

    @classmethod
    def from_bank(cls, bank, quantile: float = 0.99, *, pixel_quantile: float | None = None,
                  pixel: float | None = None) -> "Threshold":
        """Quantiles of the bank's leave-one-out scores.

        Args:
            bank: a ``musc_fast.bank.Bank`` with at least 2 images (its leave-one-out scores are cached).
            quantile: image threshold = this quantile of the M leave-one-out image scores.
            pixel_quantile: pixel threshold = this quantile of all leave-one-out map pixels; default
                (and ``pixel`` None) the image threshold.
            pixel: a fixed pixel threshold instead.
        """
        q = _check_q(quantile, "quantile")
        if pixel is not None and pixel_quantile is not None:
            raise ValueError("give pixel or pixel_quantile, not both")
        loo = bank.leave_one_out()
        image = float(np.quantile(loo.raw_image_scores, q))
        source = f"quantile {q:g} of {len(loo)} leave-one-out image scores"
        if pixel_quantile is not None:
            pq = _check_q(pixel_quantile, "pixel_quantile")
            pixel = float(np.quantile(loo.anomaly_maps, pq))
            source += f", pixel quantile {pq:g} of their maps"
        return cls(image=image, pixel=image if pixel is None else float(pixel), source=source,
                   calibrated=True)

    def apply(self, result: Result) -> Result:
        """A copy of ``result`` with ``labels`` ([N] bool, True = NG) and ``masks`` ([N, S, S] bool)."""
        labels = np.asarray(result.image_scores) > self.image
        masks = np.asarray(result.anomaly_maps) > self.pixel
        return dataclasses.replace(result, labels=labels, masks=masks)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def as_threshold(value) -> Threshold:
    """A ``Threshold`` from a ``Threshold`` or a number (fixed, pixel = image)."""
    if isinstance(value, Threshold):
        return value
    if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
        return Threshold.fixed(float(value))
    raise TypeError(f"threshold must be a Threshold or a number, got {type(value).__name__}")
