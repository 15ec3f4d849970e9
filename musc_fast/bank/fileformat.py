"""The bank file: ``save``/``load`` in the safetensors format (no pickle), its checksums and versions.

Tensors ``tokens.<i>`` per layer, ``cls``, and ``loo.patch_scores`` when the leave-one-out scores were
computed; metadata holds the format name and version, the full config JSON, a hash of the
feature-defining config fields, the image names and content hashes, ``max_size``, a SHA-256 of all
tensor bytes (``checksum``) and, since format version 2, a SHA-256 of every other metadata entry
including that checksum (``meta_checksum``), so an edited name is noticed too. ``load`` checks all of
them and raises a one-line ``BankError`` on any mismatch; version-1 files (no metadata checksum, no
content hashes) still load, with a warning.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

from ..config import MuScConfig
from ..outputs import write_file_atomic
from .store import BankError, BankStore, _diff, feature_hash

FORMAT = "musc_fast.bank"
FORMAT_VERSION = 2  # 2: metadata checksum (names, config, ... are covered) and per-image content hashes


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, raw bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no bytes copy
    return h.hexdigest()


def metadata_checksum(meta: dict[str, str]) -> str:
    """SHA-256 over every metadata entry except ``meta_checksum`` itself (sorted JSON)."""
    blob = json.dumps({k: v for k, v in meta.items() if k != "meta_checksum"}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class BankFile(BankStore):
    """``save`` and ``load`` of a ``Bank``."""

    def save(self, path: str | Path) -> Path:
        """Write the bank to a safetensors file, atomically (``outputs.write_file_atomic``)."""
        from safetensors.torch import save_file

        from .. import __version__

        path = Path(path)
        tensors = {f"tokens.{i}": t.detach().cpu().contiguous() for i, t in enumerate(self.tokens)}
        if self.cls is not None:
            tensors["cls"] = self.cls.detach().cpu().contiguous()
        loo_key = ""
        if self.has_calibration:
            tensors["loo.patch_scores"] = self._loo[1].contiguous()
            loo_key = self._loo[0]
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "musc_fast_version": __version__,
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
            "config_hash": feature_hash(self.config),
            "names": json.dumps(self.names),
            "hashes": json.dumps(self.hashes),
            "max_size": json.dumps(self.max_size),
            "loo_key": loo_key,
            "checksum": tensors_checksum(tensors),
        }
        meta["meta_checksum"] = metadata_checksum(meta)

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp), metadata=meta)
            _check_complete(tmp, tensors)  # save_file can drop write errors (seen with a full device)

        write_file_atomic(path, write)  # also gives the file the umask's mode (save_file makes it 0600)
        return path

    @classmethod
    def load(cls, path: str | Path, config: MuScConfig | None = None, *, verify: bool = True) -> "BankFile":
        """Read a bank written by ``save``.

        Args:
            config: if given, its feature fields must match the bank's (else ``BankError``); its scoring
                fields (r_list, topmin, device, ...) replace the stored ones.
            verify: check the SHA-256 of the tensor bytes (reads everything once more).
        Raises:
            BankError: missing, corrupt or foreign file, newer format, config hash, metadata checksum
                (format 2: names, config, ... edited) or checksum mismatch.
        Warns:
            RuntimeWarning: a format-1 file (its metadata is not covered by a checksum).
        """
        path = Path(path)
        if not path.is_file():
            raise BankError(f"{path}: no such bank file")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for damaged headers and data
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise BankError(f"{path}: not a readable bank file ({reason})") from None
        if meta.get("format") != FORMAT:
            raise BankError(f"{path}: not a musc_fast bank (format {meta.get('format')!r})")
        try:
            version = int(meta.get("format_version", ""))
        except ValueError:
            raise BankError(f"{path}: corrupt bank metadata (format_version)") from None
        if version > FORMAT_VERSION:
            raise BankError(f"{path}: bank format version {version} is newer than this musc_fast reads "
                            f"({FORMAT_VERSION}); upgrade musc_fast")
        if version < 1:
            raise BankError(f"{path}: unsupported bank format version {version}")
        try:
            stored = MuScConfig.from_dict(json.loads(meta["config"]))
            names = json.loads(meta["names"])
            max_size = json.loads(meta["max_size"])
            hashes = json.loads(meta["hashes"]) if version >= 2 else None
        except (KeyError, ValueError, TypeError) as exc:
            raise BankError(f"{path}: corrupt bank metadata ({' '.join(str(exc).split())[:120]})") from None
        if feature_hash(stored) != meta.get("config_hash"):
            raise BankError(f"{path}: config hash mismatch (the metadata was edited or is corrupt)")
        if version >= 2 and metadata_checksum(meta) != meta.get("meta_checksum"):
            raise BankError(f"{path}: metadata checksum mismatch (names, config or other metadata were edited "
                            "or are corrupt)")
        if version == 1:
            warnings.warn(f"{path}: bank format version 1: its names and other metadata are not covered by a "
                          f"checksum and duplicates are found by name only; save it again to upgrade "
                          f"(Bank.load(p).save(p))", RuntimeWarning, stacklevel=2)
        if verify and tensors_checksum(tensors) != meta.get("checksum"):
            raise BankError(f"{path}: checksum mismatch: the file is corrupt")
        if config is not None and feature_hash(config) != feature_hash(stored):
            raise BankError(f"{path}: the bank was built with other features ({_diff(config, stored)}); "
                            f"rebuild it or drop those options")
        n_layers = sum(1 for k in tensors if k.startswith("tokens."))
        try:
            tokens = [tensors[f"tokens.{i}"] for i in range(n_layers)]
        except KeyError:
            raise BankError(f"{path}: corrupt bank (layer tensors are not numbered 0..{n_layers - 1})") \
                from None
        bank = cls(tokens, tensors.get("cls"), config or stored, names=names, max_size=max_size,
                   hashes=hashes)
        loo = tensors.get("loo.patch_scores")
        if loo is not None and meta.get("loo_key") == bank._loo_key():
            bank._loo = (meta["loo_key"], loo)
        return bank


def _check_complete(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """OSError unless the safetensors file at ``path`` has its full length (8-byte header size + header +
    every tensor's bytes); delayed write errors surface at the fsync of ``write_file_atomic``."""
    expected_data = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(path, "rb") as fh:
        head = fh.read(8)
        size = os.fstat(fh.fileno()).st_size
    header = int.from_bytes(head, "little") if len(head) == 8 else 0
    if len(head) < 8 or size != 8 + header + expected_data:
        raise OSError(errno.ENOSPC, f"incomplete file: {size} bytes written, {8 + header + expected_data} "
                                    "expected (disk full?)")
