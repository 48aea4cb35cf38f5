"""The complaint classifier at run time: a quantized ONNX sentence encoder and a softmax head.

Only onnxruntime, tokenizers and numpy are used here; torch is a build-time tool
(`tools/build_model.py`). The encoder graph does the mean pooling and L2 normalisation itself,
so its output `sentence_embedding` is a unit vector per text and the head is a plain
`softmax(E @ W.T + b)`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from combot.modelinfo import ENCODER_FILE, HEAD_FILE, OPENER_FILE, TOKENIZER_FILE, file_sha256
from combot.modelinfo import default_model_dir as default_model_dir  # where it was first defined
from combot.sharedmodel import shared_copy

OPENER_LABELS = ("experience", "no_experience")

HEAD_FORMAT = "combot-head/1"


class ModelError(ValueError):
    """The model directory or head file is missing, malformed or does not fit the encoder."""


@dataclass(frozen=True)
class Classification:
    """One classified text: the label after thresholding, every label's score, the arg-max label."""

    label: str
    scores: dict[str, float]
    top: str
    # From the opener head (None without one): the probability that the text describes an
    # experience, and whether it counts as one (the head's threshold keeps real complaints in).
    experience: float | None = None
    described: bool | None = None


@dataclass(frozen=True)
class Head:
    """A softmax head: `labels[i]` scores `embedding @ weights[i] + bias[i]`."""

    labels: tuple[str, ...]
    weights: np.ndarray  # (n_labels, dim) float32
    bias: np.ndarray  # (n_labels,) float32
    encoder_sha256: str | None
    meta: dict[str, object]

    @classmethod
    def read(cls, path: Path) -> Head:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelError(f"head file not found: {path}") from None
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read head file {path}: {exc}") from None
        if not isinstance(raw, dict) or raw.get("format") != HEAD_FORMAT:
            raise ModelError(f"{path} is not a combot head file (expected format {HEAD_FORMAT!r})")
        try:
            labels = tuple(str(label) for label in raw["labels"])
            weights = np.asarray(raw["weights"], dtype=np.float32)
            bias = np.asarray(raw["bias"], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"malformed head file {path}: {exc}") from None
        n = len(labels)
        if n < 2 or len(set(labels)) != n:
            raise ModelError(f"head file {path} needs at least two distinct labels, got {labels}")
        if weights.ndim != 2 or weights.shape[0] != n or bias.shape != (n,):
            raise ModelError(
                f"head file {path}: weights {weights.shape} and bias {bias.shape} "
                f"do not match {n} labels"
            )
        sha = raw.get("encoder_sha256")
        meta_raw = raw.get("meta")
        meta: dict[str, object] = dict(meta_raw) if isinstance(meta_raw, dict) else {}
        return cls(labels, weights, bias, str(sha) if sha else None, meta)

    def to_json(self) -> dict[str, object]:
        return {
            "format": HEAD_FORMAT,
            "labels": list(self.labels),
            "encoder_sha256": self.encoder_sha256,
            "weights": [[float(x) for x in row] for row in self.weights],
            "bias": [float(x) for x in self.bias],
            "meta": self.meta,
        }

    def write(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        logits = embeddings.astype(np.float64) @ self.weights.T.astype(np.float64) + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)


class Encoder:
    """Tokenizer plus ONNX session: texts in, unit-length sentence embeddings out."""

    def __init__(
        self,
        model_dir: Path,
        *,
        threads: int = 1,
        max_length: int = 128,
        filename: str = ENCODER_FILE,
        weights_cache: Path | None = None,
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        onnx_path = model_dir / filename
        tokenizer_path = model_dir / TOKENIZER_FILE
        for required in (onnx_path, tokenizer_path):
            if not required.is_file():
                raise ModelError(f"model file not found: {required}")
        if threads < 1:
            raise ValueError("threads must be at least 1")
        if max_length < 2:
            raise ValueError("max_length must be at least 2")
        self.path = onnx_path
        self.max_length = max_length
        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        # The upstream tokenizer.json pads every text to 128 tokens; we pad per batch ourselves.
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_length)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        # Several server workers share the machine: idle intra-op threads must sleep, not spin.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # No memory arena: an arena keeps its high-water mark per process, and eight workers each
        # holding one cost more than the few microseconds malloc adds per inference.
        options.enable_cpu_mem_arena = False
        # With a cache folder, the copy whose weights every worker maps from one file (sharedmodel).
        shared = shared_copy(onnx_path, weights_cache) if weights_cache is not None else None
        self.loaded_from = shared or onnx_path
        self._session = ort.InferenceSession(
            str(self.loaded_from), options, providers=["CPUExecutionProvider"]
        )
        _release_freed_memory()
        self._output = self._session.get_outputs()[0].name
        self.dim = int(self._session.get_outputs()[0].shape[-1])

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Token ids and mask, padded to the longest text of this batch (never to a fixed size)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not a single string")
        # encode() one by one: encode_batch would start a rayon pool per worker process for
        # batches too small to gain from it.
        encodings = [self._tokenizer.encode(str(text)) for text in texts]
        width = max((len(e.ids) for e in encodings), default=0)
        ids = np.zeros((len(encodings), width), dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            ids[row, :n] = encoding.ids
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        feeds = self.tokenize(texts)
        if feeds["input_ids"].shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        (out,) = self._session.run([self._output], feeds)
        return np.asarray(out, dtype=np.float32)


def _release_freed_memory() -> None:
    """Give the model file's parsed copy, freed after session set-up, back to the OS (glibc keeps it)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def opener_threshold(head: Head) -> float:
    """The P(no_experience) above which the opener head says "no experience yet" (set at training)."""
    value = head.meta.get("no_experience_above", 0.5)
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ModelError(f"the opener head's no_experience_above must be a number in [0, 1), got {value!r}")
    return float(value)


class Classifier:
    """The encoder, a head and the optional opener head; `classify` is safe to call from many threads at once."""

    def __init__(
        self,
        encoder: Encoder,
        head: Head,
        *,
        threshold: float = 0.0,
        fallback_label: str | None = "Other",
        label_map: Mapping[str, str] | None = None,
        opener: Head | None = None,
    ) -> None:
        for name, checked in (("head", head), ("opener head", opener)):
            if checked is not None and checked.weights.shape[1] != encoder.dim:
                raise ModelError(
                    f"the {name} expects {checked.weights.shape[1]}-dimensional embeddings, "
                    f"the encoder produces {encoder.dim}"
                )
        if opener is not None and tuple(sorted(opener.labels)) != OPENER_LABELS:
            raise ModelError(f"the opener head's labels must be {', '.join(OPENER_LABELS)}, not {opener.labels}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError("threshold must be between 0 and 1")
        self.encoder = encoder
        self.head = head
        self.threshold = float(threshold)
        # The study's catch-all, whatever it is called (and whether or not the head has it).
        self.fallback_label = fallback_label
        # `[classifier] labels`: the head's labels as the study names its problem types.
        self.label_map = dict(label_map or {})
        self.opener = opener
        self.opener_above = opener_threshold(opener) if opener is not None else 1.0

    @classmethod
    def load(
        cls,
        model_dir: Path,
        *,
        head: Path | None = None,
        threads: int = 1,
        max_length: int = 128,
        threshold: float = 0.0,
        fallback_label: str | None = "Other",
        label_map: Mapping[str, str] | None = None,
        weights_cache: Path | None = None,
    ) -> Classifier:
        """Load the encoder from `model_dir`, the head (default: `model_dir/head.json`) and, when
        `model_dir/opener.json` exists, the opener head."""
        encoder = Encoder(Path(model_dir), threads=threads, max_length=max_length, weights_cache=weights_cache)
        head_path = Path(head) if head is not None else Path(model_dir) / HEAD_FILE
        loaded = Head.read(head_path)
        encoder_sha = file_sha256(encoder.path)
        if loaded.encoder_sha256 and loaded.encoder_sha256 != encoder_sha:
            raise ModelError(
                f"head {head_path} was trained on a different encoder than {encoder.path}; "
                "retrain it with `combot train`"
            )
        opener_path = Path(model_dir) / OPENER_FILE
        opener = Head.read(opener_path) if opener_path.is_file() else None
        if opener is not None and opener.encoder_sha256 and opener.encoder_sha256 != encoder_sha:
            raise ModelError(
                f"opener head {opener_path} was trained on a different encoder than {encoder.path}; "
                "rebuild it with tools/build_opener_head.py"
            )
        return cls(encoder, loaded, threshold=threshold, fallback_label=fallback_label, label_map=label_map,
                   opener=opener)

    @property
    def labels(self) -> tuple[str, ...]:
        """The head's labels as the study names them (after `label_map`)."""
        return tuple(self.label_map.get(label, label) for label in self.head.labels)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length sentence embeddings, shape (len(texts), dim), float32."""
        return self.encoder.embed(texts)

    def classify(self, texts: Sequence[str]) -> list[Classification]:
        embeddings = self.embed(texts)
        probs = self.head.probabilities(embeddings)
        labels = self.labels
        fallback = self.fallback_label
        experience: list[float | None] = [None] * len(probs)
        if self.opener is not None:
            column = self.opener.labels.index("experience")
            experience = [float(p) for p in self.opener.probabilities(embeddings)[:, column]]
        results = []
        for row, p_experience in zip(probs, experience, strict=True):
            best = int(row.argmax())
            top = labels[best]
            label = top
            if fallback is not None and row[best] < self.threshold:
                label = fallback
            scores = {name: float(p) for name, p in zip(labels, row, strict=True)}
            described = None if p_experience is None else (1.0 - p_experience) <= self.opener_above
            results.append(Classification(label=label, scores=scores, top=top, experience=p_experience,
                                          described=described))
        return results


_instances: dict[tuple[object, ...], Classifier] = {}
_instances_lock = threading.Lock()


def get_classifier(
    model_dir: Path,
    *,
    head: Path | None = None,
    threads: int = 1,
    max_length: int = 128,
    threshold: float = 0.0,
    fallback_label: str | None = "Other",
    label_map: Mapping[str, str] | None = None,
    weights_cache: Path | None = None,
) -> Classifier:
    """The process-wide classifier for these arguments, loaded once behind a lock."""
    key = (
        Path(model_dir).resolve(),
        Path(head).resolve() if head is not None else None,
        threads,
        max_length,
        threshold,
        fallback_label,
        tuple(sorted((label_map or {}).items())),
        weights_cache,
    )
    with _instances_lock:
        found = _instances.get(key)
        if found is None:
            found = Classifier.load(
                Path(model_dir),
                head=head,
                threads=threads,
                max_length=max_length,
                threshold=threshold,
                fallback_label=fallback_label,
                label_map=label_map,
                weights_cache=weights_cache,
            )
            _instances[key] = found
        return found


async def classify_async(
    classifier: Classifier,
    text: str,
    executor: concurrent.futures.Executor | None = None,
) -> Classification:
    """Classify one text in a worker thread so the event loop keeps serving other requests."""
    loop = asyncio.get_running_loop()
    results = await loop.run_in_executor(executor, classifier.classify, [text])
    return results[0]


class Batcher:
    """One worker's classifications: those that wait together go to the model as one batch.

    A text goes to the inference thread at once (with any that arrived in the same turn of the event
    loop); texts that arrive while it is busy wait, and all of them go together the moment it is
    free (up to `max_batch`). Nobody waits for company. A batch cost 0.81-1.10 times the CPU of its
    texts one by one in bench/classifier_bench.py runs (4-16 texts of mixed length: up to ~20% less,
    and no saving on some runs). Each caller gets the classification of its own text.
    """

    def __init__(self, classifier: Classifier, executor: concurrent.futures.Executor | None = None,
                 max_batch: int = 16):
        self.classifier = classifier
        self.executor = executor
        self.max_batch = max_batch
        self._waiting: list[tuple[str, asyncio.Future[Classification]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def classify(self, text: str) -> Classification:
        future: asyncio.Future[Classification] = asyncio.get_running_loop().create_future()
        self._waiting.append((text, future))
        if self._drainer is None:
            self._drainer = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
                batch = [(text, future) for text, future in batch if not future.done()]  # cancelled meanwhile
                if not batch:
                    continue
                try:
                    results = await loop.run_in_executor(self.executor, self.classifier.classify,
                                                         [text for text, _ in batch])
                except Exception as error:  # noqa: BLE001 - every caller of the batch gets the error
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                else:
                    for (_, future), result in zip(batch, results, strict=True):
                        if not future.done():
                            future.set_result(result)
        finally:
            self._drainer = None
