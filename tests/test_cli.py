from __future__ import annotations

from pathlib import Path
from typing import Callable

import click
import pytest
from click.testing import CliRunner

from combot.cli import cli


def test_every_command_has_help() -> None:
    for name, command in cli.commands.items():
        assert command.help and command.help.strip(), name
        assert CliRunner().invoke(cli, [name, "--help"]).exit_code == 0


def test_init_writes_an_editable_study_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(cli, ["init"])
    assert result.exit_code == 0, result.output
    assert "# Combot study definition" in (tmp_path / "combot.toml").read_text()
    again = runner.invoke(cli, ["init"])
    assert again.exit_code != 0 and "already exists" in again.output
    assert runner.invoke(cli, ["init", "--force"]).exit_code == 0


def test_check_lists_cells_and_rejects_a_bad_file(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["check"])
    assert result.exit_code == 0 and "8 cells" in result.output
    bad = tmp_path / "bad.toml"
    bad.write_text("[factors]\nbrand = []\n")
    result = runner.invoke(cli, ["check", "--config", str(bad)])
    assert result.exit_code != 0 and f"{bad}, line 2" in result.output


def test_serve_flags_are_declared_settings() -> None:
    serve = cli.commands["serve"]
    assert isinstance(serve, click.Command)
    names = {p.name for p in serve.params}
    assert {"workers", "host", "port", "database", "config_path", "trusted_hosts", "max_requests"} <= names


# --- the researcher's mistakes (issue 12): check refuses what serve would, with every line at fault ---

def line_of(path: Path, needle: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), start=1) if needle in line)


def check(path: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["check", "--config", str(path)], env=env or {})
    assert "Traceback" not in result.output
    return result.exit_code, result.output


RENAMED = {'problem_types = ["A", "B", "C", "Other"]': 'problem_types = ["Product", "B", "C", "Other"]',
           'problem = "A"': 'problem = "Product"'}


def test_a_renamed_problem_type_is_refused_until_the_head_agrees(study_file: Callable[..., Path]) -> None:
    path = study_file(RENAMED)
    code, out = check(path)
    assert code != 0
    assert f"{path}, line {line_of(path, 'problem_types =')}: [study.problem_types]" in out
    assert "answers A, B, C, Other" in out and "problem types are Product, B, C, Other" in out
    assert 'labels = { A = "Product" }' in out and "combot train" in out
    mapped = study_file({**RENAMED, "threshold = 0.4": 'threshold = 0.4\nlabels = { A = "Product" }'}, name="m.toml")
    code, out = check(mapped)
    assert code == 0, out
    wrong = study_file({**RENAMED, "threshold = 0.4": 'threshold = 0.4\nlabels = { X = "Product" }'}, name="w.toml")
    code, out = check(wrong)
    assert code != 0 and f"line {line_of(wrong, 'labels =')}: [classifier.labels] names 'X'" in out


def test_the_threshold_falls_back_to_the_catch_all_whatever_it_is_called(study_file: Callable[..., Path]) -> None:
    from combot.study import load_study
    from combot.worker import load_classifier

    path = study_file({'"A", "B", "C", "Other"]': '"Product", "B", "C", "Anything else"]', 'problem = "A"': 'problem = "Product"',
                       'problem = "Other"': 'problem = "Anything else"',
                       "threshold = 0.4": 'threshold = 1.0\nlabels = { A = "Product", Other = "Anything else" }'})
    study = load_study(path, environ={})
    verdict = load_classifier(study).classify(["My new kettle broke after two days, the handle melted."])[0]
    assert verdict.top == "Product" and verdict.label == "Anything else"
    assert set(verdict.scores) == {"Product", "B", "C", "Anything else"}


def test_check_reports_every_error_each_with_its_line(study_file: Callable[..., Path], tmp_path: Path) -> None:
    path = study_file({"threshold = 0.4": f'threshold = 4\nhead = "{tmp_path}/missing/head.json"',
                       "workers = 8": "workers = 0", "port = 8000": 'port = "eighty"',
                       'assignment = "balanced"': 'assignment = "fair"'})
    code, out = check(path)
    assert code != 0 and "has 5 problems" in out
    for needle, message in (("threshold = 4", "[classifier.threshold] must be between 0 and 1, not 4"),
                            ("head = ", "[classifier.head] no head file at"),
                            ("workers = 0", "[server.workers] must be between 1 and 256, not 0"),
                            ('port = "eighty"', "[server.port] must be a whole number"),
                            ('assignment = "fair"', "[study.assignment] must be one of balanced, random")):
        assert f"{path}, line {line_of(path, needle)}: {message}" in out, (message, out)
    code, out = check(study_file(), env={"COMBOT_THRESHOLD": "1.5"})
    assert code != 0 and "environment variable COMBOT_THRESHOLD must be between 0 and 1, not 1.5" in out


def test_unknown_placeholders_are_errors_naming_the_line_and_the_known_names(study_file: Callable[..., Path]) -> None:
    path = study_file({"?pid={participant_id}": "?pid={PROLIFIC_ID}"})
    code, out = check(path)
    assert code != 0
    assert f"line {line_of(path, 'PROLIFIC_ID')}: [survey.url] unknown placeholder {{PROLIFIC_ID}}" in out
    assert "{participant_id}, {cell}, {PROLIFIC_PID}" in out
    greeting = study_file({"Hi there, thanks": "Hi {first_name}, thanks"}, name="g.toml")
    code, out = check(greeting)
    assert code != 0 and f"line {line_of(greeting, '{first_name}')}:" in out
    assert "unknown placeholder {first_name} (this text fills in no placeholders)" in out


@pytest.mark.parametrize("url", ["localhost:11434/v1", "ftp://example.com/v1", "http:///v1", "https://host:port/v1"])
def test_an_llm_base_url_that_is_not_http_is_refused_at_its_line(study_file: Callable[..., Path], url: str) -> None:
    """Workers would otherwise start with an LLM they can never call (a scheme left out, say)."""
    path = study_file({'base_url = ""': f'base_url = "{url}"'})
    code, out = check(path)
    assert code != 0
    assert f"line {line_of(path, url)}: [llm.base_url] must be an http:// or https:// URL with a host" in out


def test_an_llm_timeout_as_long_as_the_request_timeout_is_refused_at_the_line_that_sets_it(
        study_file: Callable[..., Path]) -> None:
    """A hanging LLM must end in the offline text, not in a 503 the page retries into the same wait."""
    llm = {'base_url = ""': 'base_url = "http://127.0.0.1:9/v1"'}
    path = study_file(llm | {"timeout = 4.0": "timeout = 90.0"}, name="a.toml")
    code, out = check(path)
    assert code != 0
    assert (f"{path}, line {line_of(path, 'timeout = 90.0')}: [llm.timeout] must be shorter than [server]"
            " request_timeout (60 s, the default), not 90 s") in out
    path = study_file(llm | {"[server]\n": "[server]\nrequest_timeout = 4\n"}, name="b.toml")
    code, out = check(path)
    assert code != 0 and (f"line {line_of(path, 'timeout = 4.0')}: [llm.timeout] must be shorter than [server]"
                          " request_timeout (4 s), not 4 s") in out
    # Where the file leaves the LLM's timeout at its default, the request timeout's line is named.
    path = study_file(llm | {"[server]\n": "[server]\nrequest_timeout = 3\n", "timeout = 4.0\n": ""}, name="c.toml")
    code, out = check(path)
    assert code != 0 and (f"line {line_of(path, 'request_timeout = 3')}: [server.request_timeout] must be longer"
                          " than [llm] timeout (4 s, the default), not 3 s") in out
    code, out = check(study_file(llm, name="f.toml"), env={"COMBOT_REQUEST_TIMEOUT": "2"})
    assert code != 0 and "[server.request_timeout]" not in out
    assert "[llm.timeout] must be shorter than [server] request_timeout (2 s, from environment variable" in out
    # Shorter is fine, and without an LLM there is nothing to wait for.
    assert check(study_file(llm, name="d.toml"), env={"COMBOT_REQUEST_TIMEOUT": "4.5"})[0] == 0
    assert check(study_file(name="e.toml"), env={"COMBOT_REQUEST_TIMEOUT": "2"})[0] == 0


def test_check_prints_the_links_a_participant_gets_and_warns_about_leftovers(study_file: Callable[..., Path]) -> None:
    code, out = check(study_file())
    assert code == 0, out
    assert "survey link:     https://example.qualtrics.com/jfe/form/SV_0000000000?pid=p3f0a9c1d2e4b" in out
    assert "Warning: [survey] url still points at example.qualtrics.com" in out
    assert "Warning: [recruitment] keeps Prolific's PROLIFIC_PID but [survey] completion_url is empty" in out
    fixed = study_file({"https://example.qualtrics.com/jfe/form/SV_0000000000?pid={participant_id}":
                        "https://uni.eu.qualtrics.com/jfe/form/SV_1?pid={participant_id}&p={PROLIFIC_PID}",
                        "# completion_url = ": "completion_url = "}, name="fixed.toml")
    code, out = check(fixed)
    assert code == 0, out
    assert "pid=p3f0a9c1d2e4b&p=PROLIFIC_PID-123" in out
    assert "completion link: https://app.prolific.com/submissions/complete?cc=CODE" in out
    assert "Warning" not in out


def test_init_prints_the_commands_as_the_user_types_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["combot.pyz", "init"])
    result = CliRunner().invoke(cli, ["init"])
    assert result.exit_code == 0, result.output
    assert "`python3 combot.pyz check`" in result.output and "`python3 combot.pyz serve`" in result.output
    monkeypatch.setattr("sys.argv", ["/usr/local/bin/combot", "init"])
    result = CliRunner().invoke(cli, ["init", "--force"])
    assert "`combot check`" in result.output and "`combot serve`" in result.output


def test_serve_help_says_where_the_access_log_goes() -> None:
    result = CliRunner().invoke(cli, ["serve", "--help"], terminal_width=200)
    assert "'-': standard output" in " ".join(result.output.split())


def test_the_codebook_does_not_call_finishing_giving_an_address_when_it_can_be_declined(
        study_file: Callable[..., Path], tmp_path: Path) -> None:
    from combot import export, store
    from combot.study import load_study

    for skip, expected in (("[]", "after giving an e-mail address;"),
                           ('["skip"]', "after giving an e-mail address or declining to")):
        study = load_study(study_file({"email_skip_words = []": f"email_skip_words = {skip}"}), environ={})
        conn = store.connect(tmp_path / f"s{len(skip)}.db")
        export.export_to_dir(conn, study, tmp_path / f"out{len(skip)}")
        conn.close()
        codebook = (tmp_path / f"out{len(skip)}" / "codebook.md").read_text()
        assert expected in codebook
        assert "latency_ms` | integer | milliseconds from receiving the participant's message until this reply's" \
               " text was ready, whoever wrote it" in codebook
