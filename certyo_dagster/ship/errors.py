"""Typed failures of the Certyo API, so callers decide by kind instead of parsing status codes.

Each error says what failed (method, path, status, the server's message). None of them ever
carries the API key: the client builds every message and scrubs the key from anything the
server or the HTTP stack wrote before it gets here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# A validation error may list a thousand problems; the message names the first few.
_MAX_LISTED_ERRORS = 10


class CertyoError(Exception):
    """Any failure talking to Certyo. `status_code` is None when no response arrived.

    `errors` holds the server's per-field messages as dicts with `field`, `message` and, for
    bulk requests, the `index` of the offending record.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        method: str | None = None,
        path: str | None = None,
        error_code: str | None = None,
        errors: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.method = method
        self.path = path
        self.error_code = error_code
        self.errors: list[dict[str, Any]] = [dict(e) for e in errors]

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only attributes survive pickling (Dagster's multiprocess executor).
        return (type(self), (self.message,), dict(self.__dict__))


class CertyoAuthError(CertyoError):
    """401/403: the key is missing, wrong, revoked, or not allowed for this tenant."""


class CertyoValidationError(CertyoError):
    """400/413/422: the request itself is wrong; retrying the same body cannot succeed.

    `errors` names each bad field, with the record's `index` for bulk calls.
    """


class CertyoIdempotencyConflictError(CertyoValidationError):
    """422: an idempotency key was reused for a different payload."""


class CertyoNotFoundError(CertyoError):
    """404: the record (or endpoint) does not exist for this tenant."""


class CertyoRateLimitedError(CertyoError):
    """429 on every attempt, including the retries."""


class CertyoUnavailableError(CertyoError):
    """5xx on every attempt, a refused or dropped connection, or a timeout."""


def describe_field_errors(errors: Sequence[Mapping[str, Any]]) -> str:
    """`records[3].recordId: required; ...` for the first few server field errors."""
    parts = []
    for error in errors[:_MAX_LISTED_ERRORS]:
        field = str(error.get("field") or "")
        index = error.get("index")
        where = f"records[{index}]" if index is not None else ""
        if where and field:
            where = f"{where}.{field}"
        elif field:
            where = field
        text = str(error.get("message") or "invalid")
        parts.append(f"{where}: {text}" if where else text)
    if len(errors) > _MAX_LISTED_ERRORS:
        parts.append(f"and {len(errors) - _MAX_LISTED_ERRORS} more")
    return "; ".join(parts)
