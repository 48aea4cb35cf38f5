"""`combot train`: fit a softmax head on the shipped encoder's embeddings, in numpy, in seconds.

The head is a multinomial logistic regression with an L2 penalty on the weights (not the bias),
class-balanced, minimised by a hand-written L-BFGS. The same code trains the shipped head in
`tools/build_model.py`, so what a researcher retrains is what we ship. Embeddings are used as the
encoder returns them (unit length); nothing is standardised, because the run time does not.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from combot.classifier import HEAD_FILE, Encoder, Head, default_model_dir, file_sha256

MIN_EXAMPLES_PER_LABEL = 5
DEFAULT_L2 = 1e-3
DEFAULT_FOLDS = 5


class TrainingDataError(ValueError):
    """The labelled CSV cannot be used for training; the message names the row or label at fault."""


@dataclass(frozen=True)
class LabeledData:
    texts: list[str]
    labels: list[str]

    @property
    def label_names(self) -> list[str]:
        """Labels in a stable order: sorted, as they appear in the head and the reports."""
        return sorted(set(self.labels))


def read_labeled_csv(path: Path) -> LabeledData:
    """Read and check a `text,label` CSV: both columns, no empty cells, >= 5 examples per label."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [name.strip() for name in (reader.fieldnames or [])]
            missing = [name for name in ("text", "label") if name not in header]
            if missing:
                raise TrainingDataError(
                    f"{path}: missing column(s) {', '.join(missing)}; the first row must be a "
                    f"header with the columns text,label (found: {','.join(header) or 'nothing'})"
                )
            reader.fieldnames = header
            texts: list[str] = []
            labels: list[str] = []
            # Rows are counted as a spreadsheet shows them: the header is row 1.
            for row_number, row in enumerate(reader, start=2):
                text = row.get("text") or ""
                label = (row.get("label") or "").strip()
                if not text.strip():
                    raise TrainingDataError(f"{path}: row {row_number}: the text is empty")
                if not label:
                    raise TrainingDataError(f"{path}: row {row_number}: the label is empty")
                texts.append(text)
                labels.append(label)
    except FileNotFoundError:
        raise TrainingDataError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise TrainingDataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise TrainingDataError(f"{path}: not a valid CSV file: {exc}") from None
    counts = Counter(labels)
    if len(counts) < 2:
        raise TrainingDataError(
            f"{path}: needs at least two different labels, found {len(counts)} ({', '.join(counts) or 'none'})"
        )
    too_few = sorted(label for label, n in counts.items() if n < MIN_EXAMPLES_PER_LABEL)
    if too_few:
        detail = ", ".join(f"{label!r} has {counts[label]}" for label in too_few)
        raise TrainingDataError(
            f"{path}: each label needs at least {MIN_EXAMPLES_PER_LABEL} examples: {detail}"
        )
    return LabeledData(texts, labels)


# --- the softmax regression ----------------------------------------------------------------------


@dataclass(frozen=True)
class FittedHead:
    weights: np.ndarray  # (n_classes, dim)
    bias: np.ndarray  # (n_classes,)
    iterations: int
    converged: bool


def _balanced_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    per_class = len(y) / (n_classes * np.maximum(counts, 1.0))
    sample = per_class[y]
    return sample / sample.sum()


def _objective(
    X: np.ndarray, Y: np.ndarray, sample_weight: np.ndarray, l2: float
) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
    dim = X.shape[1]
    k = Y.shape[1]

    def value_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        W = theta[: k * dim].reshape(k, dim)
        b = theta[k * dim :]
        logits = X @ W.T + b
        logits -= logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(logits).sum(axis=1))
        log_p = logits - log_z[:, None]
        loss = -float(np.sum(sample_weight * np.sum(Y * log_p, axis=1))) + 0.5 * l2 * float(np.sum(W * W))
        residual = (np.exp(log_p) - Y) * sample_weight[:, None]
        grad_W = residual.T @ X + l2 * W
        grad_b = residual.sum(axis=0)
        return loss, np.concatenate([grad_W.ravel(), grad_b])

    return value_and_grad


def _lbfgs(
    fun: Callable[[np.ndarray], tuple[float, np.ndarray]],
    x0: np.ndarray,
    *,
    max_iter: int = 500,
    history: int = 10,
    gtol: float = 1e-6,
) -> tuple[np.ndarray, int, bool]:
    """Minimise a smooth convex function: L-BFGS with a backtracking (Armijo) line search."""
    x = x0.copy()
    f, g = fun(x)
    s_hist: list[np.ndarray] = []
    y_hist: list[np.ndarray] = []
    for iteration in range(1, max_iter + 1):
        if np.max(np.abs(g)) < gtol:
            return x, iteration - 1, True
        # Two-loop recursion for the quasi-Newton direction.
        q = g.copy()
        alphas = []
        for s, yv in zip(reversed(s_hist), reversed(y_hist)):
            rho = 1.0 / float(yv @ s)
            a = rho * float(s @ q)
            alphas.append((rho, a))
            q -= a * yv
        if s_hist:
            q *= float(s_hist[-1] @ y_hist[-1]) / float(y_hist[-1] @ y_hist[-1])
        else:
            q /= max(1.0, float(np.linalg.norm(g)))
        for (s, yv), (rho, a) in zip(zip(s_hist, y_hist), reversed(alphas)):
            beta = rho * float(yv @ q)
            q += (a - beta) * s
        direction = -q
        slope = float(g @ direction)
        if slope >= 0:  # not a descent direction: restart from steepest descent
            s_hist.clear()
            y_hist.clear()
            direction = -g
            slope = -float(g @ g)
        step = 1.0
        for _ in range(40):
            x_new = x + step * direction
            f_new, g_new = fun(x_new)
            if f_new <= f + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            return x, iteration, False
        s_vec, y_vec = x_new - x, g_new - g
        if float(s_vec @ y_vec) > 1e-12:
            s_hist.append(s_vec)
            y_hist.append(y_vec)
            if len(s_hist) > history:
                s_hist.pop(0)
                y_hist.pop(0)
        converged = abs(f - f_new) <= 1e-12 * max(1.0, abs(f))
        x, f, g = x_new, f_new, g_new
        if converged:
            return x, iteration, True
    return x, max_iter, False


def fit_softmax(
    X: np.ndarray, y: np.ndarray, n_classes: int, *, l2: float = DEFAULT_L2, max_iter: int = 500
) -> FittedHead:
    """Class-balanced multinomial logistic regression, L2 penalty `l2/2 * |W|^2` (bias free)."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    n, dim = X.shape
    Y = np.zeros((n, n_classes))
    Y[np.arange(n), y] = 1.0
    fun = _objective(X, Y, _balanced_weights(y, n_classes), l2)
    theta, iterations, converged = _lbfgs(fun, np.zeros(n_classes * dim + n_classes), max_iter=max_iter)
    return FittedHead(
        weights=theta[: n_classes * dim].reshape(n_classes, dim),
        bias=theta[n_classes * dim :],
        iterations=iterations,
        converged=converged,
    )


def predict_proba(head: FittedHead, X: np.ndarray) -> np.ndarray:
    logits = np.asarray(X, dtype=np.float64) @ head.weights.T + head.bias
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


# --- scores ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scores:
    labels: list[str]
    accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]  # label -> precision, recall, f1, support
    confusion: list[list[int]]  # rows: true label, columns: predicted label

    def to_json(self) -> dict[str, object]:
        return {
            "labels": self.labels,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "per_class": self.per_class,
            "confusion": self.confusion,
        }

    def table(self) -> str:
        """Per-class precision/recall/F1 and the confusion matrix as plain text."""
        width = max(8, *(len(label) for label in self.labels))
        lines = [f"accuracy {self.accuracy:.3f}   macro-F1 {self.macro_f1:.3f}", ""]
        lines.append(f"{'label':<{width}}  precision  recall     F1  support")
        for label in self.labels:
            c = self.per_class[label]
            lines.append(
                f"{label:<{width}}  {c['precision']:9.3f}  {c['recall']:6.3f}  {c['f1']:5.3f}  {int(c['support']):7d}"
            )
        lines += ["", "confusion (rows: true, columns: predicted)"]
        lines.append(" " * width + "  " + " ".join(f"{label:>{width}}" for label in self.labels))
        for label, row in zip(self.labels, self.confusion):
            lines.append(f"{label:<{width}}  " + " ".join(f"{n:>{width}d}" for n in row))
        return "\n".join(lines)


def score(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, labels: Sequence[str]) -> Scores:
    k = len(labels)
    confusion = np.zeros((k, k), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        confusion[t, p] += 1
    per_class: dict[str, dict[str, float]] = {}
    for i, label in enumerate(labels):
        tp = float(confusion[i, i])
        predicted = float(confusion[:, i].sum())
        support = float(confusion[i, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    total = int(confusion.sum())
    return Scores(
        labels=list(labels),
        accuracy=float(np.trace(confusion)) / total if total else 0.0,
        macro_f1=float(np.mean([per_class[label]["f1"] for label in labels])),
        per_class=per_class,
        confusion=confusion.tolist(),
    )


def stratified_folds(y: np.ndarray, folds: int, seed: int = 0) -> list[np.ndarray]:
    """Test-index arrays of `folds` folds, each label spread evenly, shuffled with a fixed seed."""
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(y), dtype=np.int64)
    offset = 0
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        rng.shuffle(members)
        # Continue the round-robin where the previous label stopped, so folds stay equal in size.
        assignment[members] = (np.arange(len(members)) + offset) % folds
        offset += len(members)
    return [np.flatnonzero(assignment == f) for f in range(folds)]


def cross_validate(
    X: np.ndarray,
    y: np.ndarray,
    labels: Sequence[str],
    *,
    folds: int = DEFAULT_FOLDS,
    l2: float = DEFAULT_L2,
    seed: int = 0,
) -> Scores:
    """Out-of-fold predictions of `fit_softmax` over stratified folds, scored together."""
    y = np.asarray(y)
    if folds < 2:
        raise ValueError("cross-validation needs at least 2 folds")
    smallest = int(np.bincount(y).min())
    if smallest < folds:
        raise TrainingDataError(f"{folds}-fold cross-validation needs at least {folds} examples per label")
    predicted = np.empty(len(y), dtype=np.int64)
    for test in stratified_folds(y, folds, seed):
        train = np.setdiff1d(np.arange(len(y)), test)
        head = fit_softmax(X[train], y[train], len(labels), l2=l2)
        predicted[test] = predict_proba(head, X[test]).argmax(axis=1)
    return score(y, predicted, labels)


# --- the whole `combot train` ------------------------------------------------------------------------


def embed_texts(encoder: Encoder, texts: Sequence[str], batch_size: int = 1) -> np.ndarray:
    """Embeddings in the input order, one text per run by default.

    The int8 encoder quantizes its activations per run (the whole padded batch shares one scale),
    so a text's embedding moves slightly with its batch companions. The server classifies each
    message alone; embedding training texts alone too trains the head on exactly what it will see.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), encoder.dim), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        out[chunk] = encoder.embed([texts[i] for i in chunk])
    return out


@dataclass(frozen=True)
class TrainResult:
    head_path: Path
    labels: list[str]
    examples: int
    cv: Scores
    folds: int
    l2: float
    counts: dict[str, int] = field(default_factory=dict)


def train_head(
    csv_path: Path,
    out_dir: Path,
    *,
    model_dir: Path | None = None,
    folds: int = DEFAULT_FOLDS,
    l2: float = DEFAULT_L2,
    seed: int = 0,
    threads: int | None = None,
    max_length: int = 128,
) -> TrainResult:
    """Read the CSV, embed it, cross-validate, fit on everything, write `out_dir/head.json`."""
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    target = Path(out_dir) / HEAD_FILE
    shipped = {(model_dir / HEAD_FILE).resolve(), (default_model_dir() / HEAD_FILE).resolve()}
    if target.resolve() in shipped:
        raise TrainingDataError(
            f"{target} is the shipped head; write yours to another directory (--out)"
        )
    data = read_labeled_csv(csv_path)
    labels = data.label_names
    index = {label: i for i, label in enumerate(labels)}
    y = np.array([index[label] for label in data.labels], dtype=np.int64)
    encoder = Encoder(model_dir, threads=threads or min(4, os.cpu_count() or 1), max_length=max_length)
    X = embed_texts(encoder, data.texts)
    cv = cross_validate(X, y, labels, folds=folds, l2=l2, seed=seed)
    fitted = fit_softmax(X, y, len(labels), l2=l2)
    counts = {label: int(n) for label, n in zip(labels, np.bincount(y, minlength=len(labels)))}
    head = Head(
        labels=tuple(labels),
        weights=fitted.weights.astype(np.float32),
        bias=fitted.bias.astype(np.float32),
        encoder_sha256=file_sha256(encoder.path),
        meta={
            "trained_on": Path(csv_path).name,
            "examples": len(y),
            "counts": counts,
            "l2": l2,
            "max_length": max_length,
            "cv_folds": folds,
            "cv": cv.to_json(),
        },
    )
    head.write(target)
    return TrainResult(target, labels, len(y), cv, folds, l2, counts)


# --- the opener head: "does this first message describe an experience yet?" -------------------------


def out_of_fold_proba(
    X: np.ndarray, y: np.ndarray, n_classes: int, *, folds: int = DEFAULT_FOLDS, l2: float = DEFAULT_L2, seed: int = 0
) -> np.ndarray:
    """Each example's probabilities from a head fitted on the other folds (stratified, seeded)."""
    y = np.asarray(y)
    out = np.zeros((len(y), n_classes))
    for test in stratified_folds(y, folds, seed):
        train = np.setdiff1d(np.arange(len(y)), test)
        out[test] = predict_proba(fit_softmax(X[train], y[train], n_classes, l2=l2), X[test])
    return out


# A first message is re-prompted only when the opener head puts the odds of "no experience yet"
# at REPROMPT_ODDS to 1 or more.
REPROMPT_ODDS = 4.0


def reprompt_threshold(odds: float = REPROMPT_ODDS) -> float:
    """The threshold on P(no_experience) above which a first message is re-prompted: odds/(1 + odds).

    A re-prompted complaint is the error researchers notice and participants resent; a greeting let
    through costs the think-high manipulation for that participant. The line leans towards letting
    text through: at odds 4 a message is re-prompted only when the head is four times surer that it
    holds no experience than that it does. (The rule it replaces, "above the highest out-of-fold
    score any training experience got", was set by the single hardest terse complaint in the
    training data and swung with every row added.)
    """
    if odds <= 0:
        raise ValueError("odds must be positive")
    return odds / (1.0 + odds)
