"""The fault script: a FIFO of misbehaviours the next matching API requests suffer.

Tests append entries with `POST /_sandbox/faults`; each `/api/v1/*` request takes the
first entry whose path matches, which is how a client's retry, timeout and idempotency
handling gets exercised against a real socket.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from certyo_sandbox.validation import ApiError, FieldError

ACTIONS = ("close_before", "close_after", "delay", "tamper_proof")
VERIFY_PATH = "/api/v1/verify/record"
MAX_DELAY_SECONDS = 600.0


@dataclass
class Fault:
    """One scripted misbehaviour, consumed `times` times."""

    path: str | None
    times: int
    status: int | None = None
    retry_after: float | None = None
    action: str | None = None
    seconds: float = 0.0

    def matches(self, path: str) -> bool:
        if self.path is not None:
            return self.path == path
        # A proof can only be tampered with in a verify response.
        return self.action != "tamper_proof" or path == VERIFY_PATH

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "times": self.times}
        if self.status is not None:
            out["status"] = self.status
            if self.retry_after is not None:
                out["retry_after"] = self.retry_after
        else:
            out["action"] = self.action
            if self.action == "delay":
                out["seconds"] = self.seconds
        return out


class FaultScript:
    """FIFO of faults; `take` hands out the first match and counts it down."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def extend(self, faults: list[Fault]) -> None:
        self._faults.extend(faults)

    def clear(self) -> None:
        self._faults.clear()

    def pending(self) -> list[dict[str, Any]]:
        return [f.describe() for f in self._faults]

    def take(self, path: str) -> Fault | None:
        for i, fault in enumerate(self._faults):
            if fault.matches(path):
                fault.times -= 1
                if fault.times <= 0:
                    del self._faults[i]
                return fault
        return None


def parse_faults(body: Any) -> list[Fault]:
    """Validate a `{"faults": [...]}` body; ApiError names every bad entry."""
    if not isinstance(body, dict) or not isinstance(body.get("faults"), list):
        raise ApiError(
            400,
            "validation_failed",
            'body must be {"faults": [...]}',
            [FieldError("faults", "required array of fault entries")],
        )
    faults: list[Fault] = []
    errors: list[FieldError] = []
    for i, entry in enumerate(body["faults"]):
        try:
            faults.append(_parse_fault(entry, i))
        except ValueError as exc:
            errors.append(FieldError(f"faults[{i}]", str(exc), i))
    if errors:
        raise ApiError(400, "validation_failed", f"{errors[0].field}: {errors[0].message}", errors)
    return faults


def _parse_fault(entry: Any, index: int) -> Fault:
    if not isinstance(entry, dict):
        raise ValueError("a fault entry must be an object")
    unknown = set(entry) - {"path", "times", "status", "retry_after", "action", "seconds"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    path = entry.get("path")
    if path is not None and (not isinstance(path, str) or not path.startswith("/")):
        raise ValueError("path must be an absolute path such as /api/v1/records/bulk")
    times = entry.get("times", 1)
    if isinstance(times, bool) or not isinstance(times, int) or times < 1:
        raise ValueError("times must be a positive integer")
    status, action = entry.get("status"), entry.get("action")
    if (status is None) == (action is None):
        raise ValueError("give exactly one of status or action")
    if status is not None:
        # An error status only: 1xx/204/304 cannot carry the JSON error body, and a scripted
        # success without processing would be a lie the client cannot detect.
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            raise ValueError("status must be an integer HTTP error status between 400 and 599")
        retry_after = entry.get("retry_after")
        if retry_after is not None and (
            isinstance(retry_after, bool)
            or not isinstance(retry_after, (int, float))
            or retry_after < 0
        ):
            raise ValueError("retry_after must be a non-negative number of seconds")
        return Fault(path, times, status=status, retry_after=retry_after)
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}")
    seconds = entry.get("seconds", 0.0)
    if action == "delay" and (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not 0 <= seconds <= MAX_DELAY_SECONDS
    ):
        raise ValueError(f"seconds must be a number between 0 and {MAX_DELAY_SECONDS}")
    return Fault(path, times, action=action, seconds=float(seconds))


class TokenBucket:
    """Per-key rate limit: `rate` requests per second with a burst of max(1, rate)."""

    def __init__(self, rate: float, clock: Any = time.monotonic) -> None:
        self._rate = rate
        self._burst = max(1.0, rate)
        self._clock = clock
        self._state: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """0 when the request may go ahead, else the seconds until a token is free."""
        now = self._clock()
        tokens, last = self._state.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if tokens >= 1.0:
            self._state[key] = (tokens - 1.0, now)
            return 0.0
        self._state[key] = (tokens, now)
        return (1.0 - tokens) / self._rate
