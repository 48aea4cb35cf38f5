"""A copy of the encoder whose weights sit in their own file, which ONNX Runtime memory-maps.

Each worker process that loads `encoder.int8.onnx` parses it into a private copy of its ~22 MB of
weights: eight workers, eight copies. ONNX Runtime memory-maps initializers stored as (page-aligned)
external data instead, so workers that load this copy share one set of pages through the page
cache. The copy is made once per machine, by ONNX Runtime itself from the shipped model (its
graph optimisations applied, its weights written out aligned), in a folder named for the model's
digest and the runtime's version; the first worker makes it, under a lock, and the rest reuse it.

(ONNX Runtime's ORT format with `session.use_ort_model_bytes_directly` would need the model's bytes
to stay where the caller put them; from Python, `InferenceSession(bytes)` copies them into a
temporary, so the session points at freed memory (a segfault with onnxruntime 1.32), and an .ort
path is read into the heap, not mapped. External data is the form that is mapped.)
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path

from combot.modelinfo import file_sha256

log = logging.getLogger("combot")

MODEL = "encoder.onnx"
WEIGHTS = "encoder.weights"


def cache_dir(setting: str) -> Path | None:
    """The folder the [classifier] weights_cache setting names ('' turns sharing off)."""
    return Path(os.path.expanduser(setting)) if setting.strip() else None


def shared_copy(onnx_path: Path, cache: Path) -> Path | None:
    """The path of the shared copy of `onnx_path` (made now if missing), or None if it cannot be made."""
    import onnxruntime as ort

    folder = cache / f"encoder-{file_sha256(onnx_path)[:16]}-ort{ort.__version__}"
    model = folder / MODEL
    if model.is_file():
        return model
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / f"{folder.name}.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one worker makes it; the others wait, then reuse it
            if model.is_file():
                return model
            scratch = Path(tempfile.mkdtemp(prefix=".making-", dir=cache))
            try:
                options = ort.SessionOptions()
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
                options.optimized_model_filepath = str(scratch / MODEL)
                options.add_session_config_entry("session.optimized_model_external_initializers_file_name", WEIGHTS)
                options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                                 "1024")
                ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
                os.replace(scratch, folder)  # whole or not at all: a reader never sees half a copy
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    except OSError as error:
        log.warning("cannot keep a shared copy of the classifier in %s (%s); each worker loads its own", cache, error)
        return None
    return model
