"""The client's pure parts: retry timing, URL safety, error mapping. No network."""

from __future__ import annotations

import pickle
import random

import pytest
from urllib3.response import HTTPResponse

from certyo_dagster import __version__
from certyo_dagster.ship.client import (
    USER_AGENT,
    CertyoClient,
    CertyoRetry,
    check_base_url,
    error_for_status,
    with_tenant,
)
from certyo_dagster.ship.errors import (
    CertyoAuthError,
    CertyoError,
    CertyoIdempotencyConflictError,
    CertyoNotFoundError,
    CertyoRateLimitedError,
    CertyoUnavailableError,
    CertyoValidationError,
)

KEY = "cty_live_pure_test_secret_0123456789"


def make_retry(sleeps: list[float], **overrides) -> CertyoRetry:
    settings = {
        "total": 5,
        "allowed_methods": None,
        "status_forcelist": {429, 500, 502, 503, 504},
        "raise_on_status": False,
        "backoff_max": 30.0,
        "backoff_initial": 1.0,
        "max_retry_after": 60.0,
        "sleeper": sleeps.append,
    }
    settings.update(overrides)
    return CertyoRetry(**settings)


def fail_with(retry: CertyoRetry, status: int, retry_after: str | None = None) -> CertyoRetry:
    """What urllib3 does after a retryable response: increment, then sleep."""
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    response = HTTPResponse(body=b"", status=status, headers=headers, preload_content=False)
    retry = retry.increment(method="POST", url="/api/v1/records/bulk", response=response)
    retry.sleep(response)
    return retry


def test_backoff_is_full_jitter_doubling_up_to_the_cap():
    random.seed(7)
    ceilings = [1.0, 2.0, 4.0, 8.0, 8.0]
    samples: list[list[float]] = [[] for _ in ceilings]
    for _ in range(200):
        sleeps: list[float] = []
        retry = make_retry(sleeps, backoff_max=8.0)
        for _ in ceilings:
            retry = fail_with(retry, 503)
        for i, s in enumerate(sleeps):
            samples[i].append(s)
    for ceiling, values in zip(ceilings, samples, strict=True):
        assert all(0.0 <= v <= ceiling for v in values)
        # Full jitter spreads over the whole range, not a fixed delay.
        assert min(values) < ceiling * 0.1
        assert max(values) > ceiling * 0.9


def test_429_without_retry_after_is_never_retried_immediately():
    random.seed(3)
    for _ in range(200):
        sleeps: list[float] = []
        retry = make_retry(sleeps)
        retry = fail_with(retry, 429)
        fail_with(retry, 429)
        assert sleeps[0] >= 0.5
        assert sleeps[1] >= 1.0


def test_retry_after_is_honoured_and_capped():
    sleeps: list[float] = []
    retry = make_retry(sleeps, max_retry_after=10.0)
    retry = fail_with(retry, 429, "3")
    retry = fail_with(retry, 503, "1.5")
    retry = fail_with(retry, 429, "3600")
    assert sleeps == [3.0, 1.5, 10.0]


def test_unparseable_retry_after_falls_back_to_backoff():
    sleeps: list[float] = []
    fail_with(make_retry(sleeps), 503, "soon")
    assert len(sleeps) == 1 and 0.0 <= sleeps[0] <= 1.0


def test_copies_made_by_urllib3_keep_our_settings():
    sleeps: list[float] = []
    retry = make_retry(sleeps, backoff_initial=0.25, max_retry_after=7.0)
    copy = fail_with(retry, 503)
    assert type(copy) is CertyoRetry
    assert (copy.backoff_initial, copy.max_retry_after, copy.sleeper) == (0.25, 7.0, sleeps.append)
    assert copy.total == 4


@pytest.mark.parametrize(
    "url",
    [
        "https://www.certyos.com",
        "https://www.certyos.com/",
        "http://127.0.0.1:8080",
        "http://127.9.9.9",
        "http://localhost:9000/",
        "http://[::1]:8080",
    ],
)
def test_https_and_loopback_http_are_accepted(url):
    assert check_base_url(url) == url.rstrip("/")


@pytest.mark.parametrize("url", ["http://certyo.example", "http://10.0.0.5:8080", "http://[::2]"])
def test_plain_http_to_another_host_is_refused(url):
    with pytest.raises(ValueError, match="plain http"):
        check_base_url(url)
    assert check_base_url(url, allow_insecure_http=True) == url


def test_client_refuses_plain_http_at_construction():
    with pytest.raises(ValueError, match="plain http") as info:
        CertyoClient("http://certyo.example", KEY, "tenant-a")
    assert KEY not in str(info.value)


@pytest.mark.parametrize("url", ["certyos.com", "ftp://certyos.com", "https://", ""])
def test_base_url_must_be_absolute_http(url):
    with pytest.raises(ValueError, match="base_url"):
        check_base_url(url)


def test_credentials_in_base_url_are_refused_without_echoing_them():
    with pytest.raises(ValueError, match="credentials") as info:
        check_base_url("https://user:hunter2@certyos.com")
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    "bad_key", ["", "cty_secret with space", "cty_secret_xyz\n", "cty_secrét_xyz"]
)
def test_malformed_api_key_is_refused_without_echoing_it(bad_key):
    with pytest.raises(ValueError, match="api_key") as info:
        CertyoClient("https://certyos.com", bad_key, "tenant-a")
    if bad_key.strip():
        assert bad_key.strip() not in str(info.value)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("connect_timeout", 0),
        ("read_timeout", -1),
        ("max_retries", -1),
        ("pool_maxsize", 0),
        ("backoff_initial_seconds", 0),
    ],
)
def test_bad_settings_name_the_field(setting, value):
    with pytest.raises(ValueError, match=setting):
        CertyoClient("https://certyos.com", KEY, "tenant-a", **{setting: value})


def test_repr_shows_url_and_tenant_but_never_the_key():
    client = CertyoClient("https://certyos.com/", KEY, "tenant-a")
    assert repr(client) == "CertyoClient(base_url='https://certyos.com', tenant_id='tenant-a')"
    assert KEY not in repr(client.retry)
    assert KEY not in repr(client._session.auth)
    assert "X-API-Key" not in client._session.headers
    assert client._session.headers["User-Agent"] == f"certyo-dagster/{__version__}" == USER_AGENT
    client.close()


def test_tenant_is_filled_in_and_a_foreign_tenant_is_refused():
    assert with_tenant({"recordId": "1"}, "t")["tenantId"] == "t"
    assert with_tenant({"recordId": "1", "tenantId": "t"}, "t")["tenantId"] == "t"
    with pytest.raises(ValueError, match="record 4 has tenantId 'other'"):
        with_tenant({"tenantId": "other"}, "t", 4)


@pytest.mark.parametrize(
    ("status", "error_code", "expected"),
    [
        (401, "unauthorized", CertyoAuthError),
        (403, "tenant_forbidden", CertyoAuthError),
        (400, "validation_failed", CertyoValidationError),
        (413, "too_many_records", CertyoValidationError),
        (422, "validation_failed", CertyoValidationError),
        (422, "idempotency_conflict", CertyoIdempotencyConflictError),
        (404, "not_found", CertyoNotFoundError),
        (429, "rate_limited", CertyoRateLimitedError),
        (500, "internal", CertyoUnavailableError),
        (503, None, CertyoUnavailableError),
        (302, None, CertyoError),
        (418, None, CertyoError),
    ],
)
def test_status_maps_to_typed_error(status, error_code, expected):
    error = error_for_status(
        "POST", "/api/v1/records", status, error_code=error_code, server_message="boom"
    )
    assert type(error) is expected
    assert error.status_code == status
    assert "POST /api/v1/records" in str(error)
    assert f"HTTP {status}" in str(error)
    assert "boom" in str(error)


def test_validation_error_names_each_bad_record():
    errors = [
        {"index": 3, "field": "records[3].recordId", "message": "recordId is required"},
        {"index": 7, "field": "records[7].recordPayload", "message": "must be an object"},
    ] + [{"index": i, "field": "x", "message": "bad"} for i in range(20)]
    error = error_for_status("POST", "/api/v1/records/bulk", 400, field_errors=errors)
    assert isinstance(error, CertyoValidationError)
    assert error.errors[0]["index"] == 3 and len(error.errors) == 22
    assert "records[3].recordId: recordId is required" in str(error)
    assert "records[7].recordPayload: must be an object" in str(error)
    assert "and 12 more" in str(error)


def test_errors_survive_pickling():
    error = error_for_status(
        "POST",
        "/api/v1/records/bulk",
        422,
        error_code="idempotency_conflict",
        field_errors=[{"index": 0, "field": "idempotencyKey", "message": "reused"}],
    )
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
    assert type(copy) is CertyoIdempotencyConflictError
    assert (copy.status_code, copy.errors, str(copy)) == (422, error.errors, str(error))


def test_a_server_message_echoing_the_key_is_scrubbed():
    import requests

    response = requests.Response()
    response.status_code = 401
    response._content = (
        b'{"error":"unauthorized","message":"unknown key ' + KEY.encode() + b'",'
        b'"errors":[{"field":"X-API-Key","message":"' + KEY.encode() + b' revoked"}]}'
    )
    client = CertyoClient("https://certyos.com", KEY, "tenant-a")
    error = client._error_for("POST", "/api/v1/records", response)
    client.close()
    assert isinstance(error, CertyoAuthError)
    assert "unknown key ***" in str(error)
    assert KEY not in str(error) and KEY not in repr(error.errors)
