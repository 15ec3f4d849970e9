"""One OpenVINO ``Core`` per process, shared by every model this package (and ``musc_fast.runtimes``) loads.

Why one: OpenVINO advises one ``Core`` per application, and separate ``Core`` objects are not only slower.
Measured with OpenVINO 2026.4.1 on CPU: in a process that had run ``ov.convert_model`` (``musc-fast
export --format openvino``), importing a compiled blob (``import_model`` or ``CACHE_DIR``) through a second
``Core`` corrupted the Python heap and the process died later with SIGSEGV; through the first ``Core`` it
did not. Settings travel per model (``compile_model(..., config)``), never as ``Core`` properties, so
sharing the object shares no state between models.
"""
from __future__ import annotations

import threading

_lock = threading.Lock()
_core = None


def shared_core():
    """The process's ``openvino.Core`` (created on first use; OpenVINO must be installed)."""
    global _core
    with _lock:
        if _core is None:
            import openvino as ov

            _core = ov.Core()
        return _core
