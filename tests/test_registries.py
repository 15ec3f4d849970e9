"""The backbone and data-set registries list their built-ins in their package ``__init__`` (no lazy
self-imports), and the bank, data and backbone packages have no import cycle (issue 12, item 5)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grimp  # comes with import-linter (the 'test' extra)
import pytest

REPO = Path(__file__).resolve().parents[1]

# Each registry module imported first and alone in a fresh interpreter, then everything imported.
_PROBE = """
import importlib, json, pkgutil, sys
registry = importlib.import_module(sys.argv[1])
first = registry.available()
pkg = importlib.import_module(sys.argv[2])
for m in pkgutil.iter_modules(pkg.__path__):
    importlib.import_module(f"{sys.argv[2]}.{m.name}")
print(json.dumps([first, registry.available()]))
"""


@pytest.mark.parametrize("registry, package, some", [
    ("musc_fast.data.registry", "musc_fast.data", {"mvtec", "visa", "btad", "folder", "synthetic"}),
    ("musc_fast.backbones.base", "musc_fast.backbones", {"ViT-B-16", "dinov2_vitb14", "efficientnet_lite0"}),
])
def test_registry_imported_alone_lists_every_builtin(registry, package, some):
    res = subprocess.run([sys.executable, "-c", _PROBE, registry, package], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    first, after_all = json.loads(res.stdout.strip().splitlines()[-1])
    assert first == after_all  # importing the other modules registered nothing new
    assert some <= set(first)


@pytest.mark.parametrize("package", ["musc_fast.bank", "musc_fast.data", "musc_fast.backbones"])
def test_no_import_cycle_through_package(package):
    """No module of ``package`` imports (at any level, functions included) a module that leads back."""
    graph = grimp.build_graph("musc_fast")
    inside = [m for m in graph.modules if m == package or m.startswith(package + ".")]
    cycles = [(m, chain) for m in inside for imp in graph.find_modules_directly_imported_by(m)
              if (chain := graph.find_shortest_chain(importer=imp, imported=m))]
    assert not cycles, cycles
