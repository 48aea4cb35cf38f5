"""`combot train` as a library: CSV checks, the numpy softmax regression, CV scores, the head file."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from combot import training
from combot.classifier import Classifier
from combot.training import TrainingDataError

MODEL_DIR = Path(__file__).resolve().parent.parent / "model"

# A researcher's own label set, unrelated to A/B/C/Other, six examples each.
TINY = {
    "food": [
        "the soup was cold and the pasta tasted of nothing",
        "my burger was raw in the middle",
        "the salad had a hair in it",
        "the pizza was burnt on the bottom",
        "the curry was far too salty to eat",
        "dessert was stale and the cream had gone off",
    ],
    "billing": [
        "I was charged twice for the same order",
        "the invoice shows a fee I never agreed to",
        "my card was billed after I cancelled",
        "they took the payment three times this month",
        "the refund never showed up on my bank statement",
        "the price at the till was higher than on the shelf",
    ],
    "noise": [
        "the neighbours played loud music all night",
        "construction drilling started at six in the morning",
        "the hotel room next door was shouting until 3am",
        "the air conditioner rattled so loudly I couldn't sleep",
        "a dog was barking for hours outside my window",
        "the bar downstairs was so loud the walls shook",
    ],
}


@pytest.fixture
def write_csv(tmp_path: Path) -> Callable[..., Path]:
    """Write rows (header first) to a CSV file and return its path."""
    def make(rows: list[list[str]], name: str = "labeled.csv", encoding: str = "utf-8") -> Path:
        path = tmp_path / name
        with open(path, "w", newline="", encoding=encoding) as fh:
            csv.writer(fh).writerows(rows)
        return path
    return make


def tiny_rows() -> list[list[str]]:
    return [["text", "label"]] + [[text, label] for label, texts in TINY.items() for text in texts]


def test_train_writes_a_head_that_loads_and_classifies(write_csv: Callable[..., Path], tmp_path: Path) -> None:
    out = tmp_path / "heads" / "mine"
    result = training.train_head(write_csv(tiny_rows()), out, model_dir=MODEL_DIR, folds=3)
    assert result.head_path == out / "head.json" and result.head_path.is_file()
    assert result.labels == ["billing", "food", "noise"]
    assert result.examples == 18 and result.counts == {"billing": 6, "food": 6, "noise": 6}
    assert result.cv.accuracy >= 0.8
    assert sum(map(sum, result.cv.confusion)) == 18
    mine = Classifier.load(MODEL_DIR, head=result.head_path)
    assert mine.labels == ("billing", "food", "noise")
    got = mine.classify(["the steak was overcooked and chewy", "they charged my credit card twice"])
    assert [r.label for r in got] == ["food", "billing"]
    assert all(sum(r.scores.values()) == pytest.approx(1.0) for r in got)


def test_training_is_deterministic(write_csv: Callable[..., Path], tmp_path: Path) -> None:
    path = write_csv(tiny_rows())
    first = training.train_head(path, tmp_path / "one", model_dir=MODEL_DIR, folds=3)
    second = training.train_head(path, tmp_path / "two", model_dir=MODEL_DIR, folds=3)
    assert first.head_path.read_text() == second.head_path.read_text()


def test_the_shipped_head_is_never_overwritten(write_csv: Callable[..., Path]) -> None:
    before = (MODEL_DIR / "head.json").read_bytes()
    with pytest.raises(TrainingDataError, match="shipped head"):
        training.train_head(write_csv(tiny_rows()), MODEL_DIR, model_dir=MODEL_DIR)
    assert (MODEL_DIR / "head.json").read_bytes() == before


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([["message", "label"], ["hi", "x"]], "missing column(s) text"),
        ([["text", "category"], ["hi", "x"]], "missing column(s) label"),
        ([], "missing column(s) text, label"),
        (tiny_rows()[:3] + [["   ", "food"]] + tiny_rows()[3:], "row 4: the text is empty"),
        (tiny_rows() + [["a new kind of complaint", ""]], "row 20: the label is empty"),
        (tiny_rows() + [["lost my luggage", "travel"]] * 3, "'travel' has 3"),
        ([["text", "label"]] + [[t, "food"] for t in TINY["food"]], "at least two different labels"),
    ],
)
def test_bad_csvs_are_rejected_with_the_reason(
    write_csv: Callable[..., Path], rows: list[list[str]], message: str
) -> None:
    with pytest.raises(TrainingDataError) as caught:
        training.read_labeled_csv(write_csv(rows))
    assert message in str(caught.value)


def test_non_utf8_and_missing_files_are_rejected(write_csv: Callable[..., Path], tmp_path: Path) -> None:
    latin = write_csv([["text", "label"], ["caf\u00e9 was rude", "x"]], encoding="latin-1")
    with pytest.raises(TrainingDataError, match="not UTF-8"):
        training.read_labeled_csv(latin)
    with pytest.raises(TrainingDataError, match="no such file"):
        training.read_labeled_csv(tmp_path / "missing.csv")


def test_a_bom_extra_columns_and_multiline_text_are_fine(write_csv: Callable[..., Path]) -> None:
    rows = [["id", "text", "label"]] + [[str(i), f"line one\nline, two {i}", "x" if i % 2 else "y"] for i in range(10)]
    path = write_csv(rows, encoding="utf-8-sig")
    data = training.read_labeled_csv(path)
    assert data.label_names == ["x", "y"] and data.texts[0] == "line one\nline, two 0"


def test_softmax_regression_separates_separable_data() -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 16)) * 3
    y = np.repeat(np.arange(3), 40)
    X = centres[y] + rng.standard_normal((120, 16))
    head = training.fit_softmax(X, y, 3, l2=1e-3)
    assert head.converged
    assert (training.predict_proba(head, X).argmax(1) == y).mean() > 0.97
    cv = training.cross_validate(X, y, ["a", "b", "c"], folds=4)
    assert cv.accuracy > 0.9 and cv.macro_f1 > 0.9


def test_stronger_l2_shrinks_the_weights() -> None:
    rng = np.random.default_rng(1)
    X = rng.standard_normal((60, 8))
    y = (X[:, 0] > 0).astype(int)
    weak = training.fit_softmax(X, y, 2, l2=1e-4)
    strong = training.fit_softmax(X, y, 2, l2=10.0)
    assert np.linalg.norm(strong.weights) < np.linalg.norm(weak.weights)


def test_scores_and_folds() -> None:
    s = training.score([0, 0, 1, 1], [0, 1, 1, 1], ["a", "b"])
    assert s.accuracy == 0.75
    assert s.confusion == [[1, 1], [0, 2]]
    assert s.per_class["a"]["precision"] == 1.0 and s.per_class["a"]["recall"] == 0.5
    assert s.macro_f1 == pytest.approx((2 / 3 + 0.8) / 2)
    assert "macro-F1" in s.table()
    y = np.array([0] * 7 + [1] * 5 + [2] * 13)
    folds = training.stratified_folds(y, 5, seed=3)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(y)))
    for fold in folds:
        assert 1 <= np.sum(y[fold] == 1) <= 1 and 4 <= len(fold) <= 6


def test_the_opener_threshold_leans_towards_letting_text_through() -> None:
    from combot.training import REPROMPT_ODDS, reprompt_threshold

    assert reprompt_threshold(4.0) == pytest.approx(0.8)
    assert reprompt_threshold(1.0) == pytest.approx(0.5)
    assert reprompt_threshold() == reprompt_threshold(REPROMPT_ODDS) > 0.5
    with pytest.raises(ValueError):
        reprompt_threshold(0)
