"""One exception hierarchy: each error knows its HTTP status, and one handler turns it into JSON."""

from __future__ import annotations


class CombotError(Exception):
    """Base class for every error Combot raises on purpose."""

    status_code = 500


class ConfigError(CombotError):
    """The study file is invalid: names the file, the key and the line at fault."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None, key: str | None = None):
        self.path = path
        self.line = line
        self.key = key
        self.reason = message
        where = ""
        if path:
            where = f"{path}"
            if line:
                where += f", line {line}"
            where += ": "
        if key:
            where += f"[{key}] "
        super().__init__(f"{where}{message}")


class ConfigErrors(ConfigError):
    """Several problems in the study file (or settings), one line each, every one naming its line."""

    def __init__(self, errors: list[ConfigError]):
        first = errors[0]
        self.errors = errors
        self.path, self.line, self.key, self.reason = first.path, first.line, first.key, first.reason
        heading = f"{first.path} has" if first.path else "There are"
        Exception.__init__(self, f"{heading} {len(errors)} problems:\n" + "\n".join(f"  {e}" for e in errors))


class BadRequest(CombotError):
    """The request is malformed (not JSON, wrong shape, wrong type)."""

    status_code = 400


class Unauthorized(CombotError):
    """No researcher token, or a wrong one."""

    status_code = 401


class Forbidden(CombotError):
    """The request claims something it cannot prove (a wrong synthetic-participant key)."""

    status_code = 403


class ConsentRequired(CombotError):
    """The study asks for consent first, and this request to start a session did not carry it."""

    status_code = 403


class NotFound(CombotError):
    """No such session or page."""

    status_code = 404


class Conflict(CombotError):
    """The conversation is over, or another request changed it first."""

    status_code = 409


class CollectionClosed(CombotError):
    """The researcher closed data collection (`combot digest --close`): no new participants or messages."""

    status_code = 410


class PayloadTooLarge(CombotError):
    """The body or the message text is over its configured size."""

    status_code = 413


class Unprocessable(CombotError):
    """Well-formed but unusable input, such as an empty message."""

    status_code = 422


class TooManyRequests(CombotError):
    """The participant is sending faster than the configured rate."""

    status_code = 429


class Unavailable(CombotError):
    """The server cannot store the message right now (database busy, disk full): try again."""

    status_code = 503
