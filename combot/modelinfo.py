"""Where the classifier's files are and what they say, read without onnxruntime or numpy.

The supervisor process checks the study against the classifier head (its labels) and stamps the
study version with the files' digests before any worker starts; it must stay small, so this module
reads the head as plain JSON.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from combot import resources
from combot.settings import Settings

ENCODER_FILE = "encoder.int8.onnx"
TOKENIZER_FILE = "tokenizer.json"
HEAD_FILE = "head.json"
# The second head on the same embeddings: does a first message describe an experience at all, or
# is it a greeting or filler ("hi", "ok")? Optional: without it every first message counts as one.
OPENER_FILE = "opener.json"

_digests: dict[tuple[str, int, int], str] = {}


def default_model_dir() -> Path:
    """Where the shipped model lives: $COMBOT_MODEL_DIR, the .pyz bundle, or the source checkout."""
    return resources.model_dir()


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file (remembered per path, size and modification time)."""
    stat = Path(path).stat()
    memo = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _digests:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _digests[memo] = digest.hexdigest()
    return _digests[memo]


def model_paths(settings: Settings) -> tuple[Path, Path]:
    """The model directory and the head file the [classifier] settings select."""
    model_dir = Path(settings["classifier.model_dir"]) if settings["classifier.model_dir"] else default_model_dir()
    head = Path(settings["classifier.head"]) if settings["classifier.head"] else model_dir / HEAD_FILE
    return model_dir, head


def head_labels(path: Path) -> tuple[str, ...]:
    """The labels a head file scores, in its order; ValueError when it is not a readable head."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the classifier head {path}: {error}") from None
    labels = raw.get("labels") if isinstance(raw, dict) else None
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ValueError(f"{path} is not a classifier head file (no list of labels)")
    return tuple(labels)
