"""The Certyo HTTP client: one pooled session, urllib3 retries, typed errors. No Dagster here.

Retries live in a urllib3 `Retry` mounted on the session, not in a loop of our own: urllib3
re-sends the identical body (so the identical idempotency keys) after a 429, a 5xx, a dropped
connection or a read timeout, sleeping with capped full-jitter backoff or the server's
Retry-After. The API key travels only in the `X-API-Key` header, added by a requests auth hook,
and is scrubbed from every message this module builds.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import takewhile
from typing import Any
from urllib.parse import urlsplit

import orjson
import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import Retry

from certyo_dagster import __version__
from certyo_dagster.ship.errors import (
    CertyoAuthError,
    CertyoError,
    CertyoIdempotencyConflictError,
    CertyoNotFoundError,
    CertyoRateLimitedError,
    CertyoUnavailableError,
    CertyoValidationError,
    describe_field_errors,
)
from certyo_dagster.ship.shipping import BULK_MAX_RECORDS

log = logging.getLogger(__name__)

RECORDS_PATH = "/api/v1/records"
BULK_PATH = "/api/v1/records/bulk"
VERIFY_PATH = "/api/v1/verify/record"

MAX_PAGE_SIZE = 1000

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
USER_AGENT = f"certyo-dagster/{__version__}"

_LOOPBACK_NAMES = frozenset({"localhost"})
_DECIMAL_SECONDS = re.compile(r"^\s*[0-9]+(\.[0-9]+)?\s*$")
_MAX_SERVER_TEXT = 500


class CertyoRetry(Retry):
    """urllib3 `Retry` with full-jitter backoff, a Retry-After cap and an injectable sleep.

    Backoff before retry n (1-based) is uniform(0, min(backoff_max, initial * 2**(n-1))).
    After a 429 without Retry-After the lower half of that range is skipped, so a rate-limited
    request is never retried immediately (reference rule 6). urllib3 copies the object through
    `new()` on every attempt, so the extra settings are carried through it.
    """

    # 413 is a payload that is too large; waiting does not shrink it.
    RETRY_AFTER_STATUS_CODES = frozenset({429, 503})

    def __init__(
        self,
        *args: Any,
        backoff_initial: float = 1.0,
        max_retry_after: float = 60.0,
        sleeper: Callable[[float], None] = time.sleep,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.backoff_initial = backoff_initial
        self.max_retry_after = max_retry_after
        self.sleeper = sleeper

    def new(self, **kw: Any) -> CertyoRetry:
        kw.setdefault("backoff_initial", self.backoff_initial)
        kw.setdefault("max_retry_after", self.max_retry_after)
        kw.setdefault("sleeper", self.sleeper)
        return super().new(**kw)

    def get_backoff_time(self) -> float:
        consecutive = len(
            list(takewhile(lambda h: h.redirect_location is None, reversed(self.history)))
        )
        if consecutive == 0:
            return 0.0
        ceiling = min(self.backoff_max, self.backoff_initial * 2 ** (consecutive - 1))
        floor = ceiling / 2 if self.history[-1].status == 429 else 0.0
        return random.uniform(floor, ceiling)

    def parse_retry_after(self, retry_after: str) -> float:
        # RFC 9110 allows whole seconds or a date; fractional seconds are accepted as well.
        if _DECIMAL_SECONDS.match(retry_after):
            seconds = float(retry_after)
        else:
            seconds = float(super().parse_retry_after(retry_after))
        return min(max(seconds, 0.0), self.max_retry_after)

    def get_retry_after(self, response: Any) -> float | None:
        try:
            return super().get_retry_after(response)
        except InvalidHeader:
            return None  # an unparseable Retry-After falls back to our own backoff

    def sleep_for_retry(self, response: Any) -> bool:
        retry_after = self.get_retry_after(response)
        if retry_after:
            self._pause(retry_after)
            return True
        return False

    def sleep(self, response: Any = None) -> None:
        has_response = self.respect_retry_after_header and response is not None
        if has_response and self.sleep_for_retry(response):
            return
        self._pause(self.get_backoff_time())

    def _pause(self, seconds: float) -> None:
        if self.history:
            last = self.history[-1]
            cause = f"HTTP {last.status}" if last.status else type(last.error).__name__
            log.info(
                "Certyo %s %s: %s, retry %d in %.2fs",
                last.method,
                (last.url or "").split("?", 1)[0],
                cause,
                len(self.history),
                seconds,
            )
        if seconds > 0:
            self.sleeper(seconds)


class _ApiKeyAuth(requests.auth.AuthBase):
    """Adds `X-API-Key` as each request is prepared, so the key is not in `session.headers`."""

    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["X-API-Key"] = self._api_key
        return request

    def __repr__(self) -> str:
        return "_ApiKeyAuth(api_key='***')"


def check_base_url(base_url: str, *, allow_insecure_http: bool = False) -> str:
    """`base_url` without a trailing slash, or ValueError if the key could leak over it.

    Plain http is refused unless the host is loopback or `allow_insecure_http` is set, because
    the API key would cross the network in clear text.
    """
    try:
        parts = urlsplit(base_url)
        host = parts.hostname
        parts.port  # noqa: B018  (raises ValueError on a malformed port)
    except ValueError:
        raise ValueError("base_url is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError(
            f"base_url {base_url!r} must be an absolute http(s) URL such as https://www.certyos.com"
        )
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "base_url must not contain credentials; the API key goes in api_key (CERTYO_API_KEY)"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"base_url {base_url!r} must not have a query string or fragment")
    if parts.scheme == "http" and not allow_insecure_http and not is_loopback_host(host):
        raise ValueError(
            f"base_url {base_url!r} uses plain http to a non-loopback host, which would send "
            "the API key in clear text; use https, or set allow_insecure_http "
            "(CERTYO_ALLOW_INSECURE_HTTP=1) if you really mean it"
        )
    return base_url.rstrip("/")


def is_loopback_host(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def with_tenant(record: Mapping[str, Any], tenant_id: str, index: int | None = None) -> dict:
    """`record` with `tenantId` filled in; a record for another tenant is a caller bug."""
    tenant = record.get("tenantId")
    if tenant is None:
        return {**record, "tenantId": tenant_id}
    if tenant != tenant_id:
        where = f"record {index}" if index is not None else "record"
        raise ValueError(
            f"{where} has tenantId {tenant!r} but this client is for tenant {tenant_id!r}"
        )
    return dict(record)


def _check_bulk_size(count: int) -> None:
    if not 1 <= count <= BULK_MAX_RECORDS:
        raise ValueError(f"a bulk call takes 1 to {BULK_MAX_RECORDS} records, got {count}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be greater than 0, got {value!r}")


def _check_api_key(api_key: str) -> None:
    # Never echo the key: a message with it would end up in Dagster's run logs.
    if not isinstance(api_key, str) or not api_key:
        raise ValueError("api_key is empty; set CERTYO_API_KEY")
    if not api_key.isascii() or not api_key.isprintable() or any(c.isspace() for c in api_key):
        raise ValueError(
            "api_key contains whitespace, control or non-ASCII characters; "
            "check CERTYO_API_KEY for a stray newline or quote"
        )


class CertyoClient:
    """Talks to one Certyo tenant over one pooled, retrying `requests.Session`.

    Safe to share between threads: the ingest path keeps several bulk posts in flight, so the
    connection pool holds `pool_maxsize` connections.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        tenant_id: str,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_retries: int = 3,
        backoff_initial_seconds: float = 1.0,
        backoff_max_seconds: float = 30.0,
        max_retry_after_seconds: float = 60.0,
        pool_maxsize: int = 16,
        allow_insecure_http: bool = False,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = check_base_url(base_url, allow_insecure_http=allow_insecure_http)
        _check_api_key(api_key)
        if not isinstance(tenant_id, str) or not tenant_id.strip():
            raise ValueError("tenant_id is empty; set CERTYO_TENANT_ID")
        _positive("connect_timeout", connect_timeout)
        _positive("read_timeout", read_timeout)
        _positive("backoff_initial_seconds", backoff_initial_seconds)
        _positive("backoff_max_seconds", backoff_max_seconds)
        if max_retry_after_seconds < 0:
            raise ValueError(
                f"max_retry_after_seconds must be 0 or more, got {max_retry_after_seconds!r}"
            )
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be a whole number >= 0, got {max_retries!r}")
        if not isinstance(pool_maxsize, int) or pool_maxsize < 1:
            raise ValueError(f"pool_maxsize must be a whole number >= 1, got {pool_maxsize!r}")

        self.tenant_id = tenant_id
        self.max_retries = max_retries
        self._timeout = (connect_timeout, read_timeout)
        self._api_key = api_key
        self.retry = CertyoRetry(
            total=max_retries,
            allowed_methods=None,  # POSTs too: identical bodies carry identical idempotency keys
            status_forcelist=RETRY_STATUSES,
            raise_on_status=False,  # the last response becomes a typed error below
            respect_retry_after_header=True,
            backoff_max=backoff_max_seconds,
            backoff_initial=backoff_initial_seconds,
            max_retry_after=max_retry_after_seconds,
            sleeper=sleep,
        )
        session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_maxsize, max_retries=self.retry)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        session.auth = _ApiKeyAuth(api_key)
        session.headers.update({"User-Agent": USER_AGENT, "Accept": "application/json"})
        self._session = session

    def __repr__(self) -> str:
        return f"CertyoClient(base_url={self.base_url!r}, tenant_id={self.tenant_id!r})"

    def __enter__(self) -> CertyoClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close pooled connections."""
        self._session.close()

    # --- ingestion -------------------------------------------------------------------------

    def ingest_record(self, record: Mapping[str, Any]) -> dict:
        """POST one record to the single-record endpoint; returns the 202 receipt."""
        body = orjson.dumps(with_tenant(record, self.tenant_id))
        return self._request("POST", RECORDS_PATH, body=body)

    def post_bulk_body(self, body: bytes, count: int) -> dict:
        """One bulk call of `count` records, already encoded (`Shipper.bulk_body`, so a retry
        re-sends the same bytes); checks that Certyo answered once per record."""
        _check_bulk_size(count)
        response = self._request("POST", BULK_PATH, body=body)
        results = response.get("results") if isinstance(response, dict) else None
        if not isinstance(results, list) or len(results) != count:
            got = len(results) if isinstance(results, list) else "no"
            raise CertyoError(
                f"POST {BULK_PATH} returned {got} results for {count} records",
                method="POST",
                path=BULK_PATH,
            )
        return response

    # --- reading ---------------------------------------------------------------------------

    def verify_record(
        self, database: str, collection: str, record_id: str, record_hash: str | None = None
    ) -> dict:
        """Anchoring status and proof of one record; CertyoNotFoundError if Certyo has none."""
        request: dict[str, Any] = {
            "tenantId": self.tenant_id,
            "database": database,
            "collection": collection,
            "recordId": record_id,
        }
        if record_hash is not None:
            request["recordHash"] = record_hash
        return self._request("POST", VERIFY_PATH, body=orjson.dumps(request))

    def query_records(
        self,
        *,
        database: str | None = None,
        collection: str | None = None,
        record_id: str | None = None,
        page_size: int = MAX_PAGE_SIZE,
    ) -> Iterator[dict]:
        """Every matching record, fetching pages lazily by following `nextCursor`."""
        if not isinstance(page_size, int) or not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be 1 to {MAX_PAGE_SIZE}, got {page_size!r}")
        params: dict[str, Any] = {"limit": page_size}
        for name, value in (
            ("database", database),
            ("collection", collection),
            ("recordId", record_id),
        ):
            if value is not None:
                params[name] = value
        seen_cursors: set[str] = set()
        while True:
            page = self._request("GET", RECORDS_PATH, params=params)
            yield from page.get("records") or []
            cursor = page.get("nextCursor")
            if not cursor:
                return
            if cursor in seen_cursors:
                raise CertyoError(
                    f"GET {RECORDS_PATH} returned cursor {cursor!r} twice; stopping to avoid "
                    "an endless loop",
                    method="GET",
                    path=RECORDS_PATH,
                )
            seen_cursors.add(cursor)
            params["cursor"] = cursor

    # --- transport -------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> Any:
        headers = {"Content-Type": "application/json"} if body is not None else None
        try:
            response = self._session.request(
                method,
                self.base_url + path,
                data=body,
                params=params,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,  # requests keeps X-API-Key on cross-host redirects
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise CertyoUnavailableError(
                f"{method} {path} failed after {self.max_retries} retries: "
                f"{type(exc).__name__}: {self._scrub(str(exc))}",
                method=method,
                path=path,
            ) from None
        except requests.RequestException as exc:
            raise CertyoError(
                f"{method} {path} failed: {type(exc).__name__}: {self._scrub(str(exc))}",
                method=method,
                path=path,
            ) from None
        with response:
            if 200 <= response.status_code < 300:
                try:
                    return orjson.loads(response.content)
                except orjson.JSONDecodeError:
                    raise CertyoError(
                        f"{method} {path} returned HTTP {response.status_code} with a body that "
                        "is not JSON",
                        status_code=response.status_code,
                        method=method,
                        path=path,
                    ) from None
            raise self._error_for(method, path, response)

    def _error_for(self, method: str, path: str, response: requests.Response) -> CertyoError:
        status = response.status_code
        try:
            payload = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):
            payload = {"message": response.text[:_MAX_SERVER_TEXT]}
        error_code = payload.get("error")
        error_code = self._scrub(str(error_code)) if error_code else None
        server_message = self._scrub(str(payload.get("message") or "")[:_MAX_SERVER_TEXT])
        field_errors = [
            {k: self._scrub(v) if isinstance(v, str) else v for k, v in e.items()}
            for e in payload.get("errors") or []
            if isinstance(e, dict)
        ]
        return error_for_status(
            method,
            path,
            status,
            error_code=error_code,
            server_message=server_message,
            field_errors=field_errors,
            retries=self.max_retries,
            location=response.headers.get("Location"),
        )

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***")


def error_for_status(
    method: str,
    path: str,
    status: int,
    *,
    error_code: str | None = None,
    server_message: str = "",
    field_errors: Sequence[Mapping[str, Any]] = (),
    retries: int = 0,
    location: str | None = None,
) -> CertyoError:
    """The typed error for a non-2xx final response."""
    detail = f"HTTP {status}"
    if error_code:
        detail += f" {error_code}"
    if server_message:
        detail += f": {server_message}"
    if field_errors:
        detail += f" ({describe_field_errors(field_errors)})"
    context = {
        "status_code": status,
        "method": method,
        "path": path,
        "error_code": error_code,
        "errors": field_errors,
    }
    if status in (401, 403):
        return CertyoAuthError(
            f"{method} {path} was refused: {detail}; check CERTYO_API_KEY and CERTYO_TENANT_ID",
            **context,
        )
    if status == 422 and "idempotency" in (error_code or "").lower():
        return CertyoIdempotencyConflictError(f"{method} {path} was rejected: {detail}", **context)
    if status in (400, 413, 422):
        return CertyoValidationError(f"{method} {path} was rejected: {detail}", **context)
    if status == 404:
        return CertyoNotFoundError(f"{method} {path} found nothing: {detail}", **context)
    if status == 429:
        return CertyoRateLimitedError(
            f"{method} {path} was still rate limited after {retries} retries: {detail}",
            **context,
        )
    if status >= 500:
        return CertyoUnavailableError(
            f"{method} {path} failed after {retries} retries: {detail}", **context
        )
    if 300 <= status < 400:
        return CertyoError(
            f"{method} {path} was redirected to {location!r} ({detail}); redirects are not "
            "followed so the API key never goes to another host; fix base_url",
            **context,
        )
    return CertyoError(f"{method} {path} failed: {detail}", **context)
