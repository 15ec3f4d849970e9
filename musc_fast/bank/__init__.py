"""A reference bank: score new images, one at a time or a few, against stored features of M images.

MuSc scores a *set* of images against each other, so one new image alone has nothing to be compared
with. A bank keeps the features of M reference images (recent production, or known-good images) and
scores each new image with the MuSc rule as if it had been scored in a batch with them.

One job per module, imports pointing down (checked by the import contracts in ``pyproject.toml``):

* ``store``: the contents (tokens, class tokens, names, content hashes), build, ``add`` with
  duplicate skipping, FIFO eviction, the config's feature hash; ``BankError``.
* ``scoring``: scoring new images against the bank (``score``, ``score_features``) and the
  leave-one-out calibration (``leave_one_out``).
* ``fileformat``: ``save``/``load``, the safetensors layout, checksums and format versions.

``Bank`` below joins them; import everything from ``musc_fast.bank``.
"""
from __future__ import annotations

from .fileformat import FORMAT, FORMAT_VERSION, BankFile, metadata_checksum, tensors_checksum
from .scoring import BankScoring
from .store import FEATURE_KEYS, SCORING_KEYS, BankError, content_hash, expand_images, feature_hash


class Bank(BankScoring, BankFile):
    """Stored reference features and the MuSc rule to score new images against them.

    >>> bank = Bank.build("good_images/", MuScConfig.preset("offline"))
    >>> bank.save("line3.safetensors")
    >>> result = Bank.load("line3.safetensors").score(["new.png"])    # result.image_scores[0]

    Attributes:
        tokens: one [M, L, C] tensor per tapped layer (the backbone's dtype), oldest image first.
        cls: [M, D] class tokens, or None.
        config: the run configuration (features must match ``feature_hash``; r_list, topmin, RsCIN,
            msm_precision and aligned_window may be changed with ``with_config``).
        names: one name per image (its path, when built from files).
        hashes: one content hash per image (``content_hash``), None where unknown.
        max_size: keep at most this many images; ``add`` evicts the oldest first (FIFO).
        has_calibration: the leave-one-out scores of the current contents are at hand.
    """


__all__ = [
    "Bank", "BankError", "BankFile", "BankScoring", "FEATURE_KEYS", "FORMAT", "FORMAT_VERSION", "SCORING_KEYS",
    "content_hash", "expand_images", "feature_hash", "metadata_checksum", "tensors_checksum",
]
