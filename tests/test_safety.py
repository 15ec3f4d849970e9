"""Safety: no code path unpickles untrusted files (checkpoints via torch.load(weights_only=True) or
safetensors; banks via safetensors only)."""
from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "musc_fast"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
            yield node, owner, name


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def test_no_unsafe_deserialisation_in_the_package():
    problems = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        rel = path.relative_to(PACKAGE.parent)
        where = lambda node, rel=rel: f"{rel}:{node.lineno}"  # noqa: E731
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal")
                       for n in names):
                    problems.append(f"{where(node)}: imports a pickle-like module")
        for call, owner, name in _calls(tree):
            if name == "load" and owner == "torch":
                wo = _keyword(call, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{where(call)}: torch.load without weights_only=True")
            if name == "load" and owner in ("np", "numpy"):
                ap = _keyword(call, "allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    problems.append(f"{where(call)}: np.load with allow_pickle")
            if name in ("loads", "load") and owner in ("pickle", "dill", "marshal"):
                problems.append(f"{where(call)}: {owner}.{name}")
    assert problems == []


def test_a_pickle_disguised_as_a_bank_is_refused_without_running_it(tmp_path):
    from musc_fast.bank import Bank, BankError

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    fake = tmp_path / "bank.safetensors"
    fake.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(BankError, match="not a readable bank file"):
        Bank.load(fake)
    assert not marker.exists()
    with pytest.raises(BankError):
        Bank.load(tmp_path / "missing.safetensors")
