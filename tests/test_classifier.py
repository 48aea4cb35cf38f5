"""The shipped classifier at run time: loading, labels, scores, threshold, the locked global, async."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from combot import classifier as clf_module
from combot import sharedmodel
from combot.classifier import (
    Classification,
    Classifier,
    Encoder,
    ModelError,
    classify_async,
    default_model_dir,
    get_classifier,
)

MODEL_DIR = Path(__file__).resolve().parent.parent / "model"

CLEAR = {
    "A": [
        "My new kettle started leaking from the bottom after two days and now it won't even switch on.",
        "the jeans ripped at the seam the first time i wore them, terrible quality",
    ],
    "B": [
        "My parcel was marked as delivered yesterday but it never arrived and the courier won't answer.",
        "the delivery is two weeks late and the tracking has been stuck at the depot since monday",
    ],
    "C": [
        "The cashier rolled her eyes, called me stupid and laughed at me in front of the whole queue.",
        "the manager shouted at me and told me to get out of his shop when I asked a question",
    ],
    "Other": [
        "hello?",
        "what is this study about and how long will it take?",
    ],
}


@pytest.fixture(scope="module")
def shipped() -> Classifier:
    return Classifier.load(MODEL_DIR)


def test_the_shipped_model_loads_with_its_four_labels(shipped: Classifier) -> None:
    assert shipped.labels == ("A", "B", "C", "Other")
    assert (MODEL_DIR / "README.md").is_file()


@pytest.mark.parametrize("label", sorted(CLEAR))
def test_clear_examples_get_their_label(shipped: Classifier, label: str) -> None:
    for result in shipped.classify(CLEAR[label]):
        assert result.label == label, result


def test_every_label_is_scored_and_the_scores_sum_to_one(shipped: Classifier) -> None:
    results = shipped.classify([text for texts in CLEAR.values() for text in texts] + [""])
    for result in results:
        assert isinstance(result, Classification)
        assert list(result.scores) == list(shipped.labels)
        assert sum(result.scores.values()) == pytest.approx(1.0, abs=1e-6)
        assert all(0.0 <= v <= 1.0 for v in result.scores.values())
        assert result.top == max(result.scores, key=result.scores.__getitem__)
    assert shipped.classify([]) == []


def test_a_weak_top_label_becomes_other_under_the_threshold(shipped: Classifier) -> None:
    text = CLEAR["B"][0]
    free = shipped.classify([text])[0]
    assert free.label == free.top == "B"
    strict = Classifier.load(MODEL_DIR, threshold=min(1.0, free.scores["B"] + 1e-3))
    held = strict.classify([text])[0]
    assert (held.label, held.top) == ("Other", "B")
    assert held.scores == pytest.approx(free.scores)
    # The fallback is the study's catch-all, whatever it is called and whether or not the head has it.
    renamed = Classifier.load(MODEL_DIR, threshold=1.0, fallback_label="Anything else")
    assert renamed.classify([text])[0].label == "Anything else"
    no_fallback = Classifier.load(MODEL_DIR, threshold=1.0, fallback_label=None)
    assert no_fallback.classify([text])[0].label == "B"


def test_a_label_map_names_the_head_labels_as_the_study_does(shipped: Classifier) -> None:
    text = CLEAR["A"][0]
    mapped = Classifier.load(MODEL_DIR, label_map={"A": "Product", "Other": "Rest"}, fallback_label="Rest")
    result = mapped.classify([text])[0]
    assert result.label == result.top == "Product" and set(result.scores) == {"Product", "B", "C", "Rest"}
    assert result.scores["Product"] == pytest.approx(shipped.classify([text])[0].scores["A"])


def test_padding_is_per_batch_and_keeps_labels(shipped: Classifier) -> None:
    short, long = "it broke", CLEAR["A"][0]
    feeds = shipped.encoder.tokenize([short, long])
    assert feeds["input_ids"].shape[1] == len(shipped.encoder.tokenize([long])["input_ids"][0]) < 128
    assert feeds["attention_mask"].sum(axis=1).tolist()[0] == len(shipped.encoder.tokenize([short])["input_ids"][0])
    together = shipped.embed([short, long])
    alone = np.vstack([shipped.embed([short]), shipped.embed([long])])
    assert together.shape == (2, 384) and together.dtype == np.float32
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-3)
    # Dynamic int8 quantization shares one activation scale per batch: close, not identical.
    assert np.all(np.sum(together * alone, axis=1) > 0.95)
    assert [r.label for r in shipped.classify([short, long])] == [
        shipped.classify([short])[0].label, shipped.classify([long])[0].label]
    assert np.array_equal(shipped.embed([long]), shipped.embed([long]))


def test_long_texts_are_truncated_at_max_length() -> None:
    short_window = Classifier.load(MODEL_DIR, max_length=16)
    feeds = short_window.encoder.tokenize(["word " * 500, "hi"])
    assert feeds["input_ids"].shape == (2, 16)
    assert short_window.classify(["word " * 500])[0].label in short_window.labels


def test_a_head_trained_on_another_encoder_is_refused(tmp_path: Path) -> None:
    raw = json.loads((MODEL_DIR / "head.json").read_text())
    raw["encoder_sha256"] = "0" * 64
    other = tmp_path / "head.json"
    other.write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="different encoder"):
        Classifier.load(MODEL_DIR, head=other)


def test_missing_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="model file not found"):
        Classifier.load(tmp_path)
    with pytest.raises(ModelError, match="head file not found"):
        Classifier.load(MODEL_DIR, head=tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ModelError, match="not a combot head"):
        Classifier.load(MODEL_DIR, head=tmp_path / "bad.json")


def test_default_model_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("COMBOT_MODEL_DIR", raising=False)
    assert default_model_dir() == MODEL_DIR
    monkeypatch.setenv("COMBOT_MODEL_DIR", str(tmp_path))
    assert default_model_dir() == tmp_path


def test_the_locked_global_loads_once_under_concurrent_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clf_module, "_instances", {})
    calls = []
    real_load = Classifier.load

    def counting_load(*args: object, **kwargs: object) -> Classifier:
        calls.append(threading.get_ident())
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Classifier, "load", counting_load)
    start = threading.Barrier(8)

    def worker() -> Classifier:
        start.wait()
        return get_classifier(MODEL_DIR, threshold=0.25)

    with ThreadPoolExecutor(max_workers=8) as pool:
        instances = list(pool.map(lambda _: worker(), range(8)))
    assert len(calls) == 1
    assert all(instance is instances[0] for instance in instances)
    assert instances[0].threshold == 0.25
    assert get_classifier(MODEL_DIR, threshold=0.25) is instances[0]
    assert get_classifier(MODEL_DIR, threshold=0.5) is not instances[0]
    assert len(calls) == 2


def test_concurrent_classification_matches_sequential(shipped: Classifier) -> None:
    texts = [text for texts in CLEAR.values() for text in texts] * 4
    expected = [shipped.classify([t])[0].scores for t in texts]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda t: shipped.classify([t])[0].scores, texts))
    assert got == expected


def test_classify_async_runs_in_an_executor(shipped: Classifier) -> None:
    async def main() -> list[Classification]:
        with ThreadPoolExecutor(max_workers=1) as pool:
            first = await classify_async(shipped, CLEAR["C"][0], pool)
        second = await classify_async(shipped, CLEAR["A"][0])
        return [first, second]

    first, second = asyncio.run(main())
    assert (first.label, second.label) == ("C", "A")


# --- the shared copy (weights memory-mapped from one file by every worker) ---------------------------

SAMPLE = [CLEAR["A"][0], CLEAR["B"][0], CLEAR["C"][0], "hello", "x " * 300]


def test_the_shared_copy_scores_exactly_like_the_shipped_model(shipped: Classifier, tmp_path: Path) -> None:
    shared = Classifier.load(default_model_dir(), weights_cache=tmp_path / "cache")
    assert shared.encoder.loaded_from.parent.parent == tmp_path / "cache"
    assert np.allclose(shared.embed(SAMPLE), shipped.embed(SAMPLE), atol=1e-6)
    assert [c.label for c in shared.classify(SAMPLE)] == [c.label for c in shipped.classify(SAMPLE)]
    # Its weights are mapped from their own file, not read into the process.
    weights = shared.encoder.loaded_from.parent / sharedmodel.WEIGHTS
    assert weights.stat().st_size > 10_000_000
    assert str(weights) in Path("/proc/self/maps").read_text()


def test_the_shared_copy_is_made_once_and_then_reused(tmp_path: Path) -> None:
    model = default_model_dir() / "encoder.int8.onnx"
    first = sharedmodel.shared_copy(model, tmp_path)
    assert first is not None
    made = first.stat().st_mtime_ns
    assert sharedmodel.shared_copy(model, tmp_path) == first and first.stat().st_mtime_ns == made
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".making-")]  # no half-made copies left


def test_without_a_writable_cache_each_worker_loads_the_model_itself(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    encoder = Encoder(default_model_dir(), weights_cache=blocked / "cache")
    assert encoder.loaded_from == default_model_dir() / "encoder.int8.onnx"
    assert encoder.embed(["my parcel is late"]).shape == (1, encoder.dim)
    assert sharedmodel.cache_dir("") is None and sharedmodel.cache_dir("~/x") == Path.home() / "x"


# --- the opener head: does a first message describe an experience yet? (issue 11) --------------------

OPENERS = Path(__file__).resolve().parent.parent / "data" / "openers"


def test_the_opener_head_keeps_every_real_complaint_on_the_held_out_openers(shipped: Classifier) -> None:
    """data/openers/valid.csv was written apart from the training data and never trained on."""
    import csv

    from combot import training

    with open(OPENERS / "valid.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    said = [shipped.classify([row["text"]])[0] for row in rows]
    truth = [0 if row["label"] == "experience" else 1 for row in rows]
    scores = training.score(truth, [0 if s.described else 1 for s in said], ["experience", "no_experience"])
    print("\nopeners valid.csv:\n" + scores.table())
    assert scores.per_class["experience"]["recall"] == 1.0, [
        row["text"] for row, s in zip(rows, said) if row["label"] == "experience" and not s.described]
    # The line leans towards letting text through (odds 4:1, terse complaints in training): a few
    # greetings are taken as experiences (6 of 70 here, 1 before the terse complaints), the price
    # of never re-prompting a one-word complaint.
    assert scores.per_class["experience"]["precision"] >= 0.93
    assert scores.per_class["no_experience"]["recall"] >= 0.9


def test_the_opener_head_on_the_evaluators_hold_out(shipped: Classifier) -> None:
    """data/openers/openers_holdout.csv: 200 openers written by an independent evaluator (first
    measured at 198/200, recall of experiences 0.991). It has since been looked at while fixing
    terse complaints, so it holds the line rather than measuring afresh."""
    import csv

    from combot import training

    with open(OPENERS / "openers_holdout.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 200
    said = [shipped.classify([row["text"]])[0] for row in rows]
    truth = [0 if row["label"] == "experience" else 1 for row in rows]
    scores = training.score(truth, [0 if s.described else 1 for s in said], ["experience", "no_experience"])
    print("\nopeners openers_holdout.csv:\n" + scores.table())
    assert scores.per_class["experience"]["recall"] >= 0.99, [
        row["text"] for row, s in zip(rows, said) if row["label"] == "experience" and not s.described]
    assert scores.per_class["no_experience"]["recall"] >= 0.9


@pytest.mark.parametrize("text, described", [
    ("hi", False), ("hello?", False), ("ok", False), ("I have a complaint", False),
    ("hi, my parcel never came", True), ("rude cashier", True), ("the app keeps charging me twice", True),
])
def test_the_opener_verdict(shipped: Classifier, text: str, described: bool) -> None:
    result = shipped.classify([text])[0]
    assert result.described is described and result.experience is not None and 0 <= result.experience <= 1


def test_without_an_opener_head_there_is_no_verdict(tmp_path: Path) -> None:
    for name in ("encoder.int8.onnx", "tokenizer.json", "head.json"):
        (tmp_path / name).symlink_to(MODEL_DIR / name)
    result = Classifier.load(tmp_path).classify(["hi"])[0]
    assert result.described is None and result.experience is None


def test_an_opener_head_from_another_encoder_is_refused(tmp_path: Path) -> None:
    for name in ("encoder.int8.onnx", "tokenizer.json", "head.json"):
        (tmp_path / name).symlink_to(MODEL_DIR / name)
    raw = json.loads((MODEL_DIR / "opener.json").read_text())
    raw["encoder_sha256"] = "0" * 64
    (tmp_path / "opener.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="opener head .* different encoder"):
        Classifier.load(tmp_path)


@pytest.mark.slow
def test_the_opener_head_rebuilds_the_same(tmp_path: Path) -> None:
    """tools/build_opener_head.py is reproducible: the shipped opener.json is what it builds."""
    import subprocess
    import sys

    root = MODEL_DIR.parent
    subprocess.run([sys.executable, str(root / "tools" / "build_opener_head.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=600)
    built = json.loads((tmp_path / "opener.json").read_text())
    shipped = json.loads((MODEL_DIR / "opener.json").read_text())
    assert built["meta"]["no_experience_above"] == pytest.approx(shipped["meta"]["no_experience_above"], abs=1e-9)
    assert np.allclose(built["weights"], shipped["weights"], atol=1e-5)
    assert (tmp_path / "OPENERS.md").read_text() == (MODEL_DIR / "OPENERS.md").read_text()


def test_texts_waiting_together_are_classified_as_one_batch_each_with_its_own_label(shipped: Classifier) -> None:
    texts = [text for label in ("A", "B", "C", "Other") for text in CLEAR[label]] * 3
    calls: list[int] = []

    class Counting(Classifier):
        def classify(self, texts_: list[str]) -> list[Classification]:  # type: ignore[override]
            calls.append(len(texts_))
            return super().classify(texts_)

    counting = Counting(shipped.encoder, shipped.head, threshold=shipped.threshold)
    alone = {text: shipped.classify([text])[0] for text in texts}

    async def burst() -> list[Classification]:
        with ThreadPoolExecutor(max_workers=1) as pool:
            batcher = clf_module.Batcher(counting, pool, max_batch=8)
            together = list(await asyncio.gather(*(batcher.classify(text) for text in texts)))
            await batcher.classify(texts[0])  # a text on its own goes at once, alone
            return together

    results = asyncio.run(burst())
    # Those waiting together went in batches of at most 8.
    assert calls[:-1] == [8, 8, 8] and calls[-1] == 1
    for text, result in zip(texts, results):
        assert result.label == alone[text].label
        # Not bit-identical: the int8 encoder quantizes its activations per batch.
        assert result.scores == pytest.approx(alone[text].scores, abs=0.01)


def test_a_failed_batch_fails_each_of_its_callers_and_the_next_one_works(shipped: Classifier) -> None:
    class Flaky(Classifier):
        failures = 1

        def classify(self, texts_: list[str]) -> list[Classification]:  # type: ignore[override]
            if self.failures:
                self.failures -= 1
                raise RuntimeError("inference failed")
            return super().classify(texts_)

    async def run() -> tuple[list[object], Classification]:
        with ThreadPoolExecutor(max_workers=1) as pool:
            batcher = clf_module.Batcher(Flaky(shipped.encoder, shipped.head), pool)
            first = await asyncio.gather(*(batcher.classify(t) for t in CLEAR["A"]), return_exceptions=True)
            return list(first), await batcher.classify(CLEAR["B"][0])

    first, later = asyncio.run(run())
    assert [type(r) for r in first] == [RuntimeError, RuntimeError] and later.label == "B"
