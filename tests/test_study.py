from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from combot.errors import ConfigError
from combot.study import load_study
from tests.conftest import DEFAULT_STUDY


def line_of(path: Path, needle: str) -> int:
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(needle)


def test_the_default_study_is_the_original_2x2x2_design() -> None:
    study = load_study(DEFAULT_STUDY)
    assert list(study.factors) == ["brand", "think", "feel"]
    assert len(study.cells()) == 8
    assert study.followup_turns == 4
    assert study.problem_types == ("A", "B", "C", "Other")
    assert [study.cell_number(c) for c in study.cells()] == list(range(1, 9))


def test_the_bundled_default_loads_without_a_path() -> None:
    assert len(load_study().cells()) == 8


@pytest.mark.parametrize("replace, needle, message", [
    ({"followup_turns = 4": "followup_turns = 4\ncolour = 3"}, "colour = 3", "unknown key 'colour'"),
    ({"followup_turns = 4": 'followup_turns = "four"'}, 'followup_turns = "four"', "must be a whole number"),
    ({'assignment = "balanced"': 'assignment = "alphabetical"'}, 'assignment = "alphabetical"', "must be one of"),
    ({'when = { feel = "low" }\ntext = ""': 'when = { feel = "lo" }\ntext = ""'}, 'feel = "lo"', "'lo' is not a level of feel"),
    ({'when = { think = "low" }\nmode = "paraphrase"': 'when = { think = "low" }\nmode = "parrot"'}, 'mode = "parrot"', "mode must be one of"),
    ({'colour = "#2f6b3a"': 'colour = "green"'}, 'colour = "green"', "colour must look like"),
    ({"workers = 8": "workers = \"many\""}, "workers = \"many\"", "must be a whole number"),
    ({"[study]": "[study]\nbogus = 1"}, "bogus = 1", "unknown key 'bogus'"),
    ({'  "I see, {reflection}. Please go on, what happened next?",':
      '  "I see, {reflectoin}. Please go on, what happened next?",'}, "{reflectoin}", "unknown placeholder {reflectoin}"),
])
def test_a_bad_file_names_the_line_at_fault(study_file: Callable[..., Path], replace: dict[str, str], needle: str,
                                            message: str) -> None:
    path = study_file(replace)
    with pytest.raises(ConfigError) as caught:
        load_study(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)
    assert caught.value.line == line_of(path, needle), str(caught.value)


def test_missing_text_for_a_cell_is_rejected(study_file: Callable[..., Path]) -> None:
    path = study_file({'[factors]\nbrand = ["basic", "bramble"]': '[factors]\nbrand = ["basic", "bramble", "acme"]'})
    with pytest.raises(ConfigError, match="no \\[\\[presentation\\]\\] block applies to cell acme-high-high"):
        load_study(path)


def test_a_bank_shorter_than_the_follow_up_turns_is_rejected(study_file: Callable[..., Path]) -> None:
    path = study_file({"followup_turns = 4": "followup_turns = 7"})
    with pytest.raises(ConfigError, match="has 6 questions; followup_turns = 7"):
        load_study(path)


def test_invalid_toml_reports_its_line(study_file: Callable[..., Path]) -> None:
    path = study_file({'title = "Customer service conversation"': 'title = "unclosed'})
    with pytest.raises(ConfigError) as caught:
        load_study(path)
    assert caught.value.line == line_of(path, 'title = "unclosed')


def test_factors_and_turns_are_data(study_file: Callable[..., Path]) -> None:
    """A researcher drops the brand factor, adds a tone factor and shortens the chat, in TOML only."""
    path = study_file({
        'brand = ["basic", "bramble"]\n': 'tone = ["plain", "chatty"]\n',
        "followup_turns = 4": "followup_turns = 2",
        'when = { brand = "basic" }\nname': 'when = { tone = "plain" }\nname',
        'when = { brand = "bramble" }\nname': 'when = { tone = "chatty" }\nname',
        'when = { brand = "basic", think = "high" }': 'when = { tone = "plain", think = "high" }',
        'when = { brand = "basic", think = "low" }': 'when = { tone = "plain", think = "low" }',
        'when = { brand = "bramble", think = "high" }': 'when = { tone = "chatty", think = "high" }',
        'when = { brand = "bramble", think = "low" }': 'when = { tone = "chatty", think = "low" }',
        'when = { brand = "bramble", problem = "A" }': 'when = { tone = "chatty", problem = "A" }',
        'when = { brand = "bramble", problem = "B" }': 'when = { tone = "chatty", problem = "B" }',
        'when = { brand = "bramble", problem = "C" }': 'when = { tone = "chatty", problem = "C" }',
    })
    study = load_study(path)
    assert list(study.factors) == ["tone", "think", "feel"]
    assert study.followup_turns == 2 and len(study.cells()) == 8


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_study(tmp_path / "missing.toml")


def test_environment_and_overrides_beat_the_file() -> None:
    study = load_study(DEFAULT_STUDY, environ={"COMBOT_WORKERS": "3"})
    assert study.settings["server.workers"] == 3
    study = load_study(DEFAULT_STUDY, environ={"COMBOT_WORKERS": "3"}, overrides={"server.workers": 5})
    assert study.settings["server.workers"] == 5
    assert load_study(DEFAULT_STUDY, environ={}).settings["server.workers"] == 8
