"""The study definition: loading and checking combot.toml.

A study is its factors (every combination of levels is a cell) and blocks of text, each applying
to the cells its `when` table matches. `load_study` rejects anything it cannot use with the file,
the key and the line at fault, before the server binds a port.
"""

from __future__ import annotations

import itertools
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from combot.errors import ConfigError, ConfigErrors
from combot.modelinfo import ENCODER_FILE, TOKENIZER_FILE, head_labels, model_paths
from combot.resources import logo_problem
from combot.settings import OPTIONS, SECTIONS, Settings, option, resolve, resolve_checked
from combot.timing import MAX_SECONDS, MODES, Timing

Cell = Mapping[str, str]

# Each block kind: the keys it takes (name -> type), which are required, and whether its `when`
# may name a problem type.
_TEXT = {"text": str}
_TEXTS = {"texts": list}
BLOCK_KINDS: dict[str, dict[str, Any]] = {
    "presentation": {"keys": {"name": str, "logo": str, "colour": str}, "required": {"name", "colour"}, "problem": False},
    "greeting": {"keys": _TEXT, "required": {"text"}, "problem": False},
    "reprompt": {"keys": _TEXT, "required": {"text"}, "problem": False},
    "followups": {"keys": {"mode": str}, "required": {"mode"}, "problem": False},
    "questions": {"keys": _TEXTS, "required": {"texts"}, "problem": True},
    "paraphrase": {"keys": {"texts": list, "short_texts": list}, "required": {"texts"}, "problem": True},
    "empathy": {"keys": _TEXT, "required": {"text"}, "problem": False},
    "closing": {"keys": _TEXT, "required": {"text"}, "problem": False},
    "email_retry": {"keys": _TEXT, "required": {"text"}, "problem": False},
    "thanks": {"keys": _TEXT, "required": {"text"}, "problem": False},
    "llm_prompt": {"keys": {"task": str, "system": str}, "required": {"task", "system"}, "problem": True},
    "timing": {"keys": {"mode": str, "base": float, "chars_per_second": float, "jitter": float, "min": float,
                        "max": float}, "required": set(), "problem": False},
}
FOLLOWUP_MODES = ("questions", "paraphrase")
# What an LLM may be asked to do (Reply.llm_task in the engine); each has its own [[llm_prompt]] blocks.
LLM_TASKS = ("paraphrase",)
STUDY_KEYS = {"title": str, "followup_turns": int, "problem_types": list, "assignment": str, "seed": int,
              "fill": str, "active_minutes": int, "email_skip_words": list, "max_reprompts": int}
SURVEY_KEYS = {"url": str, "link_label": str, "completion_url": str, "completion_label": str}
ASSIGNMENT_METHODS = ("balanced", "random")
# What counts towards a cell's size for balanced assignment (see store.cell_counts).
FILL_RULES = ("started", "finished_or_active")
_COLOUR = re.compile(r"^#[0-9a-fA-F]{6}$")
# A {NAME} in a text or URL; each kind of block fills in only the names listed here.
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
TEXT_PLACEHOLDERS: dict[str, set[str]] = {"paraphrase": {"reflection"}}
T = TypeVar("T")


@dataclass(frozen=True)
class Block:
    kind: str
    when: Mapping[str, str]
    values: Mapping[str, Any]
    line: int | None = None

    def matches(self, cell: Cell, problem: str | None) -> bool:
        for key, level in self.when.items():
            if key == "problem":
                if level != problem:
                    return False
            elif cell.get(key) != level:
                return False
        return True


@dataclass(frozen=True)
class Study:
    title: str
    factors: Mapping[str, tuple[str, ...]]
    followup_turns: int
    problem_types: tuple[str, ...]
    assignment: str
    seed: int | None
    survey_url: str
    survey_label: str
    completion_url: str
    blocks: Mapping[str, tuple[Block, ...]]
    settings: Settings = field(default_factory=lambda: resolve({}, {}))
    path: str = "<default>"
    fill: str = "started"
    active_minutes: int = 30
    completion_label: str = "Finish and return to the study platform"
    # Replies that decline to give an e-mail address (empty: an address is required).
    email_skip_words: tuple[str, ...] = ()
    # How often the bot asks again when a first message holds no experience yet ("hi", "ok").
    max_reprompts: int = 2
    # Filled by `versioning.stamp` before a study is served or exported (empty until then).
    version: str = ""
    version_text: str = ""
    head_sha256: str = ""
    encoder_sha256: str = ""

    @property
    def catch_all(self) -> str:
        return self.problem_types[-1]

    def cells(self) -> list[dict[str, str]]:
        """Every combination of factor levels, in a stable order (the first factor varies slowest)."""
        names = list(self.factors)
        return [dict(zip(names, combo)) for combo in itertools.product(*(self.factors[n] for n in names))]

    def cell_label(self, cell: Cell) -> str:
        return "-".join(cell[name] for name in self.factors)

    def cell_description(self, cell: Cell) -> str:
        """The cell for people: `brand: bramble · think: high · feel: low`."""
        return " · ".join(f"{name}: {cell[name]}" for name in self.factors)

    def cell_number(self, cell: Cell) -> int:
        return self.cells().index(dict(cell)) + 1

    def block(self, kind: str, cell: Cell, problem: str | None = None) -> Block | None:
        """The most specific block of this kind that applies to the cell (and problem type)."""
        best: Block | None = None
        for candidate in self.blocks.get(kind, ()):
            if candidate.matches(cell, problem) and (best is None or len(candidate.when) > len(best.when)):
                best = candidate
        return best

    def text(self, kind: str, cell: Cell, problem: str | None = None) -> str:
        found = self.block(kind, cell, problem)
        if found is None:  # load_study guarantees this for every cell; reaching it is a bug
            raise LookupError(f"no [[{kind}]] text for cell {self.cell_label(cell)}")
        return str(found.values["text"])

    def texts(self, kind: str, cell: Cell, problem: str | None = None) -> tuple[str, ...]:
        found = self.block(kind, cell, problem)
        return tuple(found.values["texts"]) if found else ()

    def llm_prompt(self, task: str, cell: Cell, problem: str | None = None) -> str | None:
        """The system prompt of the most specific [[llm_prompt]] block for this task, cell and problem."""
        best: Block | None = None
        for candidate in self.blocks.get("llm_prompt", ()):
            if (candidate.values["task"] == task and candidate.matches(cell, problem)
                    and (best is None or len(candidate.when) > len(best.when))):
                best = candidate
        return str(best.values["system"]) if best else None

    def followup_mode(self, cell: Cell) -> str:
        found = self.block("followups", cell)
        return str(found.values["mode"]) if found else "paraphrase"

    def timing(self, cell: Cell) -> Timing:
        """The cell's reply timing: its most specific [[timing]] block, unless `[server] reply_timing`
        sets one mode for every cell (`combot bench` uses "none"). Without a block: "matched" when an
        LLM is configured, else "none"."""
        default_mode = "matched" if str(self.settings["llm.base_url"]).strip() else "none"
        found = self.block("timing", cell)
        timing = Timing.from_values(found.values if found else {}, default_mode)
        override = self.settings["server.reply_timing"]
        return timing if override == "study" else Timing.from_values({**(found.values if found else {}),
                                                                      "mode": override}, default_mode)

    def presentation(self, cell: Cell) -> dict[str, str]:
        found = self.block("presentation", cell)
        assert found is not None
        return {key: str(value) for key, value in found.values.items()}


def _line_index(source: str) -> dict[tuple[Any, ...], int]:
    """Map key paths to the line that defines them: a small scan, since tomllib keeps no positions."""
    index: dict[tuple[Any, ...], int] = {}
    prefix: tuple[Any, ...] = ()
    array_counts: dict[tuple[Any, ...], int] = {}
    for number, raw in enumerate(source.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[["):
            name = tuple(part.strip().strip('"') for part in line.strip("[] \t").split("."))
            position = array_counts.get(name, 0)
            array_counts[name] = position + 1
            prefix = name + (position,)
            index.setdefault(prefix, number)
            continue
        if line.startswith("["):
            prefix = tuple(part.strip().strip('"') for part in line.split("]")[0].strip("[ \t").split("."))
            index.setdefault(prefix, number)
            continue
        match = re.match(r'^([A-Za-z0-9_\-."]+)\s*=', line)
        if match:
            key = tuple(part.strip('"') for part in match.group(1).split("."))
            index.setdefault(prefix + key, number)
    return index


class _Checker:
    """Where each key of the file is, and every problem found so far (all are reported, not only the first)."""

    def __init__(self, path: str, source: str):
        self.path = path
        self.lines = _line_index(source)
        self.source_lines = source.splitlines()
        self.errors: list[ConfigError] = []

    def line(self, *key: Any) -> int | None:
        for end in range(len(key), 0, -1):
            if key[:end] in self.lines:
                return self.lines[key[:end]]
        return None

    def fail(self, message: str, *key: Any, text: str | None = None) -> ConfigError:
        """An error at `key`; with `text`, at the line inside a multi-line value that holds that text."""
        shown = ".".join(str(k) if not isinstance(k, int) else f"#{k + 1}" for k in key) or None
        line = self.line(*key)
        if text and line:
            for number in range(line, len(self.source_lines) + 1):
                if text[:60] in self.source_lines[number - 1]:
                    line = number
                    break
        return ConfigError(message, path=self.path, line=line, key=shown)

    def add(self, message: str, *key: Any, text: str | None = None) -> None:
        self.errors.append(self.fail(message, *key, text=text))

    def attempt(self, fn: Callable[[], T]) -> T | None:
        """Run one independent check; its ConfigError is recorded and checking goes on."""
        try:
            return fn()
        except ConfigError as error:
            self.errors.append(error)
            return None

    def typed(self, value: Any, kind: type, *key: Any) -> Any:
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            names = {str: "a string", int: "a whole number", list: "a list", dict: "a table", float: "a number"}
            raise self.fail(f"must be {names.get(kind, kind.__name__)}, not {type(value).__name__}", *key)
        if kind is list and not all(isinstance(item, str) for item in value):
            raise self.fail("must be a list of strings", *key)
        return value

    def known(self, table: Mapping[str, Any], allowed: set[str], *key: Any) -> None:
        for name in table:
            if name not in allowed:
                hint = ", ".join(sorted(allowed))
                self.add(f"unknown key '{name}' (expected one of: {hint})", *key, name)


def load_study(path: str | Path | None = None, *, source: str | None = None, environ: Mapping[str, str] | None = None,
               overrides: Mapping[str, Any] | None = None, check_classifier: bool = True) -> Study:
    """Read and check a study file (or `source` text); the bundled default when both are None.

    Everything `serve` needs is checked here, once, before any worker starts: types, ranges, files
    that must exist, placeholders, and that the classifier's labels are the study's problem types
    (not with `check_classifier=False`: `combot train` makes the head that fixes a mismatch). Every
    problem found is reported (ConfigErrors), each naming its line.
    """
    if source is None:
        if path is None:
            from combot.resources import default_study_path

            path = default_study_path()
        try:
            source = Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"cannot read the study file: {error.strerror}", path=str(path)) from None
        except UnicodeDecodeError:
            raise ConfigError("the study file is not UTF-8 text", path=str(path)) from None
    shown_path = str(path) if path is not None else "<string>"
    try:
        data = tomllib.loads(source)
    except tomllib.TOMLDecodeError as error:
        match = re.search(r"line (\d+)", str(error))
        raise ConfigError(f"not valid TOML: {error}", path=shown_path, line=int(match.group(1)) if match else None) from None
    check = _Checker(shown_path, source)
    result = _build(data, check, environ, overrides, check_classifier)
    if len(check.errors) == 1:
        raise check.errors[0]
    if check.errors:
        raise ConfigErrors(sorted(check.errors, key=lambda e: e.line or 0))
    assert result is not None
    return result


def _build(data: dict[str, Any], check: _Checker, environ: Mapping[str, str] | None,
           overrides: Mapping[str, Any] | None, check_classifier: bool = True) -> Study | None:
    top_level = {"study", "factors", "survey", *SECTIONS, *BLOCK_KINDS}
    check.known(data, top_level)

    study = check.attempt(lambda: check.typed(data.get("study", {}), dict, "study")) or {}
    check.known(study, set(STUDY_KEYS), "study")
    for key, expected in STUDY_KEYS.items():
        if key in study and check.attempt(lambda: check.typed(study[key], expected, "study", key)) is None:
            del study[key]  # reported; the default stands in so the rest can still be checked
    followup_turns = study.get("followup_turns", 4)
    if not 0 <= followup_turns <= 20:
        check.add("must be between 0 and 20", "study", "followup_turns")
    problem_types = tuple(study.get("problem_types", ["A", "B", "C", "Other"]))
    if len(problem_types) < 2 or len(set(problem_types)) != len(problem_types):
        check.add("needs at least two different problem types", "study", "problem_types")
    assignment = study.get("assignment", "balanced")
    if assignment not in ASSIGNMENT_METHODS:
        check.add(f"must be one of {', '.join(ASSIGNMENT_METHODS)}", "study", "assignment")
    if study.get("fill", "started") not in FILL_RULES:
        check.add(f"must be one of {', '.join(FILL_RULES)}", "study", "fill")
    if not 1 <= study.get("active_minutes", 30) <= 7 * 24 * 60:
        check.add("must be between 1 and 10080 minutes", "study", "active_minutes")
    if not 0 <= study.get("max_reprompts", 2) <= 10:
        check.add("must be between 0 and 10", "study", "max_reprompts")

    factors_table = check.attempt(lambda: check.typed(data.get("factors", {}), dict, "factors")) or {}
    if not factors_table:
        check.add("the study needs at least one factor, e.g. brand = [\"basic\", \"bramble\"]", "factors")
    factors: dict[str, tuple[str, ...]] = {}
    for name, levels in factors_table.items():
        if check.attempt(lambda: check.typed(levels, list, "factors", name)) is None:
            continue
        if not levels or len(set(levels)) != len(levels):
            check.add("needs one or more distinct levels", "factors", name)
        elif name == "problem":
            check.add("'problem' is reserved for the problem type", "factors", name)
        else:
            factors[name] = tuple(levels)

    survey = check.attempt(lambda: check.typed(data.get("survey", {}), dict, "survey")) or {}
    check.known(survey, set(SURVEY_KEYS), "survey")
    for key in list(survey):
        if check.attempt(lambda: check.typed(survey[key], str, "survey", key)) is None:
            del survey[key]

    file_settings: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        table = check.attempt(lambda: check.typed(data.get(section, {}), dict, section)) or {}
        allowed = {o.name for o in OPTIONS if o.section == section}
        check.known(table, allowed, section)
        file_settings[section] = {k: v for k, v in table.items() if k in allowed}
    settings, problems = resolve_checked(file_settings, environ, overrides)
    for problem in problems:
        if problem.source == "file":
            check.add(problem.message, problem.section, problem.name)
        else:
            check.errors.append(ConfigError(f"{problem.where} {problem.message}"))
    bad_settings = {(p.section, p.name) for p in problems}
    environ = os.environ if environ is None else environ

    def where(section: str, name: str) -> str:
        """Where a setting's value came from: "file", or the flag or environment variable that set it."""
        opt = option(section, name)
        if (overrides or {}).get(f"{section}.{name}") is not None:
            return "--" + name.replace("_", "-")
        if opt.env_name in environ:
            return f"environment variable {opt.env_name}"
        return "file" if name in file_settings.get(section, {}) else f"[{section}] {name} (default)"

    # Without the classifier check (`combot train`, `classify`), the head may not exist yet.
    _check_files(settings, check, bad_settings | (set() if check_classifier else {("classifier", "head")}), where)

    blocks: dict[str, tuple[Block, ...]] = {}
    for kind, spec in BLOCK_KINDS.items():
        entries = data.get(kind, [])
        if not isinstance(entries, list):
            check.add(f"write it as [[{kind}]] blocks", kind)
            entries = []
        parsed = []
        for position, entry in enumerate(entries):
            block = check.attempt(lambda: _block(kind, spec, entry, position, factors, problem_types, check))
            if block is not None:
                parsed.append(block)
        blocks[kind] = tuple(parsed)

    _check_survey_links(survey, settings, check)
    _check_timeouts(settings, check, bad_settings, where)
    if check_classifier and not bad_settings & {("classifier", "head"), ("classifier", "model_dir"),
                                                ("classifier", "labels")}:
        _check_classifier_labels(problem_types, settings, check)
    if check.errors:
        return None  # coverage is checked on a study whose parts all loaded
    result = Study(
        title=study.get("title", "Customer service conversation"),
        factors=factors,
        followup_turns=followup_turns,
        problem_types=problem_types,
        assignment=assignment,
        seed=study.get("seed"),
        survey_url=survey.get("url", ""),
        survey_label=survey.get("link_label", "Continue to the survey"),
        completion_url=survey.get("completion_url", ""),
        completion_label=survey.get("completion_label", "Finish and return to the study platform"),
        fill=study.get("fill", "started"),
        active_minutes=study.get("active_minutes", 30),
        email_skip_words=tuple(word.strip().lower() for word in study.get("email_skip_words", []) if word.strip()),
        max_reprompts=study.get("max_reprompts", 2),
        blocks=blocks,
        settings=settings,
        path=check.path,
    )
    _check_coverage(result, check)
    return result


def _check_files(settings: Settings, check: _Checker, bad: set[tuple[str, str]],
                 where: Callable[[str, str], str]) -> None:
    """Files and folders the settings name must exist (the database itself is created when missing)."""
    def at(section: str, name: str, message: str) -> None:
        source = where(section, name)
        if source == "file":
            check.add(message, section, name)
        else:
            check.errors.append(ConfigError(f"{source}: {message}"))

    model_dir, head = model_paths(settings)
    if ("classifier", "model_dir") not in bad:
        for required in (model_dir / ENCODER_FILE, model_dir / TOKENIZER_FILE):
            if not required.is_file():
                at("classifier", "model_dir", f"no classifier at {model_dir}: {required.name} is missing")
                break
    if ("classifier", "head") not in bad and not head.is_file():
        at("classifier", "head", f"no head file at {head} (train one with `combot train LABELED.CSV --out DIR`)")
    for name in ("database", "access_log"):
        value = settings[f"server.{name}"]
        if value and value != "-" and not Path(value).resolve().parent.is_dir():
            at("server", name, f"the folder {Path(value).resolve().parent} does not exist")


def _check_classifier_labels(problem_types: tuple[str, ...], settings: Settings, check: _Checker) -> None:
    """The head's labels, after `[classifier] labels`, must be the study's problem types (the catch-all,
    the last of them, may be missing from the head: the threshold falls back to it)."""
    catch_all = problem_types[-1]
    _, head = model_paths(settings)
    if not head.is_file():
        return  # reported by _check_files
    try:
        raw_labels = head_labels(head)
    except ValueError as error:
        check.add(str(error), "classifier", "head")
        return
    mapping = settings["classifier.labels"]
    where = ("classifier", "labels") if ("classifier", "labels") in check.lines else ("study", "problem_types")
    for name, target in mapping.items():
        if name not in raw_labels:
            check.add(f"names '{name}', which the classifier head does not answer (it answers:"
                      f" {', '.join(raw_labels)})", "classifier", "labels")
            return
        if target not in problem_types:
            check.add(f"maps {name} to '{target}', which is not a problem type ({', '.join(problem_types)})",
                      "classifier", "labels")
            return
    mapped = [mapping.get(label, label) for label in raw_labels]
    if set(mapped) in (set(problem_types), set(problem_types) - {catch_all}) \
            and len(set(mapped)) == len(mapped):
        return
    unmatched = [label for label in raw_labels if mapping.get(label, label) not in problem_types]
    missing = [p for p in problem_types if p not in mapped and p != catch_all]
    suggestion = ""
    if unmatched and len(unmatched) == len(missing):
        pairs = ", ".join(f'{a} = "{b}"' for a, b in zip(unmatched, missing))
        suggestion = f" (here: labels = {{ {pairs} }})"
    check.add(f"the classifier head {head} answers {', '.join(mapped)} but the study's problem types are"
              f" {', '.join(problem_types)}. Map the head's labels to them under [classifier]{suggestion},"
              " or train a head on your own labels with `combot train` and select it with [classifier] head",
              *where)


def _block(kind: str, spec: Mapping[str, Any], entry: Any, position: int, factors: Mapping[str, tuple[str, ...]],
           problem_types: tuple[str, ...], check: _Checker) -> Block:
    key = (kind, position)
    check.typed(entry, dict, *key)
    for name in entry:
        if name not in set(spec["keys"]) | {"when"}:
            raise check.fail(f"unknown key '{name}' (expected one of: {', '.join(sorted(set(spec['keys']) | {'when'}))})",
                             *key, name)
    when = check.typed(entry.get("when", {}), dict, *key, "when")
    for factor, level in when.items():
        if factor == "problem" and spec["problem"]:
            if level not in problem_types:
                raise check.fail(f"unknown problem type '{level}' (expected one of: {', '.join(problem_types)})", *key, "when")
            continue
        if factor not in factors:
            raise check.fail(f"'when' names '{factor}', which is not a factor ({', '.join(factors)})", *key, "when")
        if level not in factors[factor]:
            raise check.fail(f"'{level}' is not a level of {factor} ({', '.join(factors[factor])})", *key, "when")
    for name in spec["required"]:
        if name not in entry:
            raise check.fail(f"missing '{name}'", *key)
    values: dict[str, Any] = {}
    for name, kind_type in spec["keys"].items():
        if name in entry:
            values[name] = check.typed(entry[name], kind_type, *key, name)
    if "texts" in values and not values["texts"]:
        raise check.fail("needs at least one text", *key, "texts")
    if kind == "followups" and values["mode"] not in FOLLOWUP_MODES:
        raise check.fail(f"mode must be one of {', '.join(FOLLOWUP_MODES)}", *key, "mode")
    if kind == "presentation" and not _COLOUR.match(values["colour"]):
        raise check.fail("colour must look like #35506b", *key, "colour")
    if kind == "llm_prompt":
        if values["task"] not in LLM_TASKS:
            raise check.fail(f"task must be one of {', '.join(LLM_TASKS)}", *key, "task")
        if not values["system"].strip():
            raise check.fail("must not be empty", *key, "system")
    if kind == "timing":
        _check_timing(values, check, *key)
    # Placeholders: only paraphrase templates fill one ({reflection}); anywhere else a {NAME} would
    # reach participants as it is written.
    allowed = TEXT_PLACEHOLDERS.get(kind, set())
    for name in ("text", "texts", "short_texts", "system"):
        for text in ([values[name]] if isinstance(values.get(name), str) else values.get(name, [])):
            _check_placeholders(text, allowed, check, *key, name)
    for name in ("text",):
        if name in values and kind not in ("empathy",) and not values[name].strip():
            raise check.fail("must not be empty", *key, name)
    return Block(kind, dict(when), values, check.line(*key))


def _check_timing(values: Mapping[str, Any], check: _Checker, *key: Any) -> None:
    if "mode" in values and values["mode"] not in MODES:
        raise check.fail(f"mode must be one of {', '.join(MODES)}", *key, "mode")
    timing = Timing.from_values(values, "none")
    limits = {"base": (0.0, MAX_SECONDS), "chars_per_second": (0.1, 10_000.0), "jitter": (0.0, 0.9),
              "min": (0.0, MAX_SECONDS), "max": (0.0, MAX_SECONDS)}
    for name, (low, high) in limits.items():
        value = getattr(timing, name)
        if not low <= value <= high:
            raise check.fail(f"must be between {low:g} and {high:g}", *key, name if name in values else "max")
    if timing.min > timing.max:
        raise check.fail(f"min ({timing.min:g} s) is more than max ({timing.max:g} s)", *key,
                         "min" if "min" in values else "max")


def _check_placeholders(text: str, allowed: set[str], check: _Checker, *key: Any) -> None:
    for name in PLACEHOLDER.findall(text):
        if name not in allowed:
            known = (f"known here: {', '.join('{' + a + '}' for a in sorted(allowed))}" if allowed
                     else "this text fills in no placeholders")
            raise check.fail(f"unknown placeholder {{{name}}} ({known})", *key, text=text)


def link_placeholders(settings: Settings) -> tuple[str, ...]:
    """What the survey and completion URLs may name: {participant_id}, {cell} and each kept URL parameter."""
    names = ["participant_id", "cell", *settings["recruitment.params"]]
    if settings["recruitment.platform_id"]:
        names.append(settings["recruitment.platform_id"])
    return tuple(dict.fromkeys(names))


def _check_survey_links(survey: Mapping[str, str], settings: Settings, check: _Checker) -> None:
    known = link_placeholders(settings)
    for key in ("url", "completion_url"):
        for name in re.findall(r"\{([^{}]*)\}", survey.get(key, "")):
            if name not in known:
                check.add(f"unknown placeholder {{{name}}} (known: {', '.join('{' + k + '}' for k in known)};"
                          " a URL parameter must be listed in [recruitment] params to be kept)", "survey", key)


def _check_timeouts(settings: Settings, check: _Checker, bad: set[tuple[str, str]],
                    where: Callable[[str, str], str]) -> None:
    """The LLM must give up (and the offline text answer) before the request itself is cut off:
    otherwise a hanging LLM ends the participant's turn in a 503 and every retry waits as long."""
    if not settings["llm.base_url"] or bad & {("llm", "timeout"), ("server", "request_timeout")}:
        return
    llm_timeout, request_timeout = settings["llm.timeout"], settings["server.request_timeout"]
    if llm_timeout < request_timeout:
        return

    def source(section: str, name: str) -> str:
        origin = where(section, name)
        return "" if origin == "file" else ", the default" if origin.endswith("(default)") else f", from {origin}"

    why = ": a hanging LLM would end a participant's turn in an error instead of the offline text"
    llm, request = f"{llm_timeout:g} s", f"{request_timeout:g} s"
    if where("llm", "timeout") == "file":
        check.add(f"must be shorter than [server] request_timeout ({request}{source('server', 'request_timeout')}),"
                  f" not {llm}" + why, "llm", "timeout")
    elif where("server", "request_timeout") == "file":
        check.add(f"must be longer than [llm] timeout ({llm}{source('llm', 'timeout')}), not {request}" + why,
                  "server", "request_timeout")
    else:
        check.errors.append(ConfigError(f"[llm] timeout ({llm}{source('llm', 'timeout')}) must be shorter than"
                                        f" [server] request_timeout ({request}{source('server', 'request_timeout')})"
                                        + why))


def _check_coverage(study: Study, check: _Checker) -> None:
    """Every cell must have every text it can need, so no participant can reach a gap (the first gap
    of each kind is reported)."""
    reported: set[str] = set()

    def gap(kind: str, message: str, *key: Any) -> None:
        if kind not in reported:
            reported.add(kind)
            check.add(message, *key)

    for cell in study.cells():
        label = study.cell_label(cell)
        for kind in ("presentation", "greeting", "empathy", "closing", "email_retry", "thanks"):
            if study.block(kind, cell) is None:
                gap(kind, f"no [[{kind}]] block applies to cell {label}", kind)
        if study.max_reprompts and study.block("reprompt", cell) is None:
            gap("reprompt", f"no [[reprompt]] block applies to cell {label} (add one, or set"
                            f" [study] max_reprompts = 0 to never ask again after a greeting)", "reprompt")
        mode = study.followup_mode(cell)
        for problem in study.problem_types:
            if study.followup_turns and not study.texts("paraphrase", cell, problem):
                gap("paraphrase", f"no [[paraphrase]] block applies to cell {label}, problem {problem}", "paraphrase")
            if (study.followup_turns and study.settings["llm.base_url"]
                    and study.llm_prompt("paraphrase", cell, problem) is None):
                gap("llm_prompt", f"an LLM is configured but no [[llm_prompt]] with task = \"paraphrase\" applies to"
                                  f" cell {label}, problem {problem}", "llm_prompt")
            if mode == "questions" and problem != study.catch_all and study.followup_turns:
                bank = study.block("questions", cell, problem)
                if bank is None:
                    gap("questions", f"no [[questions]] bank for cell {label}, problem {problem}", "questions")
                elif len(bank.values["texts"]) < study.followup_turns:
                    gap("questions",
                        f"the bank for cell {label}, problem {problem} has {len(bank.values['texts'])} questions;"
                        f" followup_turns = {study.followup_turns} needs that many", "questions",
                        study.blocks["questions"].index(bank), "texts")
    for position, block in enumerate(study.blocks.get("presentation", ())):
        problem = logo_problem(study.path, str(block.values["logo"])) if block.values.get("logo") else ""
        if problem:
            check.add(problem, "presentation", position, "logo")
