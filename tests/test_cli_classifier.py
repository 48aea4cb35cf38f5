"""`combot classify` and `combot train` end to end through click's CliRunner."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from click.testing import CliRunner

from combot.cli import cli
from tests.test_training import TINY


def invoke(*args: str, stdin: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), input=stdin)
    return result.exit_code, result.output


def test_classify_prints_label_and_scores() -> None:
    code, out = invoke("classify", "my parcel never arrived and tracking is stuck", "the cashier was rude to me")
    assert code == 0, out
    lines = out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("B\t") and lines[1].startswith("C\t")
    for name in ("A ", "B ", "C ", "Other "):
        assert name in lines[0]


def test_classify_json_one_object_per_text() -> None:
    code, out = invoke("classify", "--json", "--threshold", "0", "the zip broke after one day", "hello?")
    assert code == 0, out
    objects = [json.loads(line) for line in out.strip().splitlines()]
    assert [o["label"] for o in objects] == ["A", "Other"]
    assert objects[0]["text"] == "the zip broke after one day"
    for o in objects:
        assert set(o["scores"]) == {"A", "B", "C", "Other"}
        assert abs(sum(o["scores"].values()) - 1) < 1e-6
        assert o["top"] == max(o["scores"], key=o["scores"].get)


def test_classify_reads_stdin_and_applies_the_threshold() -> None:
    code, out = invoke("classify", "--json", "--threshold", "1", "-",
                       stdin="my order came three weeks late\n\nthe manager yelled at me\n")
    assert code == 0, out
    objects = [json.loads(line) for line in out.strip().splitlines()]
    assert [o["text"] for o in objects] == ["my order came three weeks late", "the manager yelled at me"]
    assert [(o["label"], o["top"]) for o in objects] == [("Other", "B"), ("Other", "C")]


def test_classify_reports_a_missing_head(tmp_path: Path) -> None:
    code, out = invoke("classify", "--head", str(tmp_path / "none.json"), "hi")
    assert code != 0 and "head file not found" in out or "no head file at" in out


def test_train_then_classify_with_the_new_head(tmp_path: Path) -> None:
    data = tmp_path / "mine.csv"
    with open(data, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows([text, label] for label, texts in TINY.items() for text in texts)
    out_dir = tmp_path / "heads"
    code, out = invoke("train", str(data), "--out", str(out_dir), "--folds", "3")
    assert code == 0, out
    head = out_dir / "head.json"
    assert head.is_file()
    assert "3-fold cross-validated" in out and "macro-F1" in out
    assert f'head = "{head.as_posix()}"' in out
    code, out = invoke("classify", "--json", "--head", str(head), "the fries were soggy and cold")
    assert code == 0, out
    assert json.loads(out)["label"] == "food"


def test_train_rejects_a_bad_csv(tmp_path: Path) -> None:
    data = tmp_path / "bad.csv"
    data.write_text("text,label\nmy parcel is late,B\nrude staff,C\n", encoding="utf-8")
    code, out = invoke("train", str(data), "--out", str(tmp_path / "heads"))
    assert code != 0
    assert "Error:" in out and "at least 5 examples" in out and "'B' has 1" in out
    assert not (tmp_path / "heads").exists()
