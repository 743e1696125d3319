"""The sandbox's ASGI application: Certyo's HTTP contract on top of `SandboxStore`.

Request handling is synchronous inside the event loop on purpose: one request's SQLite
transaction never interleaves with another's, which is what makes bulk calls atomic and
idempotency checks race-free without locks. Starlette supplies the Request/Response
types; routing is a dict because the API has six paths.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from certyo_dagster.prove.chain import ChainRpcError
from certyo_sandbox.chain import ChainAnchorer
from certyo_sandbox.config import SandboxConfig
from certyo_sandbox.faults import Fault, FaultScript, TokenBucket, parse_faults
from certyo_sandbox.store import SandboxStore, StoredVersion, iso_utc
from certyo_sandbox.validation import (
    ApiError,
    FieldError,
    Leniencies,
    bulk_envelope,
    validate_bulk,
    validate_single,
)

log = logging.getLogger("certyo_sandbox")

# Where `SandboxHttpProtocol` puts the connection's transport in the ASGI scope.
TRANSPORT_SCOPE_KEY = "certyo.sandbox.transport"
MAX_QUERY_LIMIT = 1000
DEFAULT_QUERY_LIMIT = 100
QUERY_FILTERS = ("database", "collection", "recordId")

Handler = Callable[[Request, str], Awaitable[Response]]


class _Dropped(Exception):
    """The connection was aborted on purpose; no response must be sent."""


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def error_response(error: ApiError) -> Response:
    return json_response(error.body(), error.status, error.headers or None)


def verify_body(
    version: StoredVersion, now: float, anchor_delay: float, *, on_chain: bool = False
) -> dict[str, Any]:
    """The verify response for one stored version at time `now`.

    A record is verified once accepted, part of a Merkle tree (with a proof and an IPFS
    id) once its batch flushed, and anchored on chain `anchor_delay` seconds after that.
    With `on_chain` (the sandbox anchors on a real chain), it is anchored only once its
    batch's transaction is mined too, and the answer names that transaction, its block and
    the chain id.
    """
    in_tree = version.merkle_root is not None and version.flushed_ts is not None
    anchored = in_tree and now >= version.flushed_ts + anchor_delay  # type: ignore[operator]
    if on_chain:
        anchored = anchored and version.chain_transaction_hash is not None
    body: dict[str, Any] = {
        "verified": True,
        "anchoredOnChain": anchored,
        "recordId": version.fields["recordId"],
        "recordHash": version.record_hash,
        "transactionHash": version.transaction_hash if anchored else None,
        "status": "anchored" if anchored else ("batched" if in_tree else "pending"),
        "tenantId": version.fields["tenantId"],
        "database": version.fields["database"],
        "collection": version.fields["collection"],
        "recordVersion": version.fields["recordVersion"],
        "acceptedAt": version.accepted_at,
        "merkleRoot": version.merkle_root.hex() if in_tree else None,  # type: ignore[union-attr]
        "merkleProof": None,
        "ipfsCid": version.ipfs_cid if in_tree else None,
        "blockNumber": version.block_number if anchored else None,
        "anchoredAt": (
            iso_utc(version.flushed_ts + anchor_delay)  # type: ignore[operator]
            if anchored
            else None
        ),
    }
    if on_chain and anchored:
        body["transactionHash"] = version.chain_transaction_hash
        body["blockNumber"] = version.chain_block_number
        body["chainId"] = version.chain_id
        body["anchoredAt"] = iso_utc(
            max(version.chain_anchored_ts, version.flushed_ts + anchor_delay)  # type: ignore[arg-type, operator]
        )
    if in_tree:
        body["merkleProof"] = {
            "leafIndex": version.leaf_index,
            "treeSize": version.tree_size,
            "auditPath": [node.hex() for node in version.audit_path],
        }
    return body


def tamper_with_proof(body: dict[str, Any]) -> None:
    """Flip one byte of the first audit path node, or of the root when the path is empty."""
    proof = body.get("merkleProof")
    if proof and proof["auditPath"]:
        proof["auditPath"][0] = _flip_first_byte(proof["auditPath"][0])
    elif body.get("merkleRoot"):
        body["merkleRoot"] = _flip_first_byte(body["merkleRoot"])


def _flip_first_byte(hex_digest: str) -> str:
    raw = bytearray(bytes.fromhex(hex_digest))
    raw[0] ^= 0x01
    return raw.hex()


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, number = text.partition(":")
        if prefix != "seq" or not (number.isascii() and number.isdigit()):
            raise ValueError(cursor)
        seq = int(number)
        if seq >= 2**63:  # beyond SQLite's INTEGER
            raise ValueError(cursor)
        return seq
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(
            400,
            "validation_failed",
            "cursor is not a cursor this API returned",
            [FieldError("cursor", "unrecognised cursor")],
        ) from exc


class SandboxApp:
    """ASGI callable serving the Certyo API, `/healthz` and the `/_sandbox/*` controls."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.store: SandboxStore | None = None
        self.faults = FaultScript()
        self.limiter = TokenBucket(config.rate_limit_rps) if config.rate_limit_rps else None
        self.requests_by_status: Counter[int] = Counter()
        self.idempotent_replays = 0
        self.leniencies: Leniencies = Counter()
        # API requests in progress per API key, and the most there ever were at once.
        self._in_flight: Counter[str] = Counter()
        self._max_in_flight: Counter[str] = Counter()
        self._anchor_task: asyncio.Task | None = None
        self.chain = ChainAnchorer(config.chain_rpc) if config.chain_rpc else None
        self.chain_failures = 0
        self._chain_lock: asyncio.Lock | None = None
        self._api_routes: dict[tuple[str, str], Handler] = {
            ("POST", "/api/v1/records"): self._ingest_one,
            ("POST", "/api/v1/records/bulk"): self._ingest_bulk,
            ("POST", "/api/v1/verify/record"): self._verify,
            ("GET", "/api/v1/records"): self._query,
        }
        self._control_routes: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]] = {
            ("GET", "/healthz"): self._healthz,
            ("GET", "/_sandbox/stats"): self._stats,
        }
        if config.enable_fault_injection:
            self._control_routes.update(
                {
                    ("POST", "/_sandbox/faults"): self._add_faults,
                    ("GET", "/_sandbox/faults"): self._list_faults,
                    ("DELETE", "/_sandbox/faults"): self._clear_faults,
                    ("POST", "/_sandbox/flush"): self._force_flush,
                }
            )

    # -- ASGI plumbing ----------------------------------------------------------------

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        try:
            response = await self._dispatch(request)
        except (_Dropped, ClientDisconnect):
            return
        except Exception:  # a bug in a control endpoint; answer in the API's error shape
            log.exception("unexpected error handling %s %s", request.method, request.url.path)
            response = error_response(ApiError(500, "internal_error", "sandbox bug; see its log"))
        await response(scope, receive, send)

    async def _lifespan(self, receive: Callable, send: Callable) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self.startup()
                except Exception as exc:  # report, don't hang uvicorn
                    log.exception("sandbox failed to start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def startup(self) -> None:
        self.store = SandboxStore(self.config.db_path)
        self._chain_lock = asyncio.Lock()
        self._flush_due(time.time())
        self._anchor_task = asyncio.get_running_loop().create_task(self._anchor_loop())
        log.info(
            "certyo-sandbox ready: tenants=%s db=%s flush_records=%d flush_seconds=%s chain=%s",
            sorted(set(self.config.api_keys.values())),
            self.config.db_path,
            self.config.flush_records,
            self.config.flush_seconds,
            self.config.chain_rpc or "simulated",
        )

    async def shutdown(self) -> None:
        if self._anchor_task is not None:
            self._anchor_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._anchor_task
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.chain is not None:
            self.chain.close()

    async def _dispatch(self, request: Request) -> Response:
        key = (request.method, request.url.path)
        api_handler = self._api_routes.get(key)
        try:
            if api_handler is not None:
                return await self._api(request, api_handler)
            control = self._control_routes.get(key)
            if control is not None:
                return await control(request)
            if any(
                path == request.url.path for _, path in (*self._api_routes, *self._control_routes)
            ):
                raise ApiError(405, "method_not_allowed", f"{request.method} is not allowed here")
            raise ApiError(404, "not_found", f"no such endpoint: {request.url.path}")
        except ApiError as error:
            return error_response(error)

    async def _api(self, request: Request, handler: Handler) -> Response:
        key = request.headers.get("x-api-key", "")
        self._in_flight[key] += 1
        self._max_in_flight[key] = max(self._max_in_flight[key], self._in_flight[key])
        try:
            return await self._api_counted(request, handler)
        finally:
            self._in_flight[key] -= 1

    async def _api_counted(self, request: Request, handler: Handler) -> Response:
        fault = self.faults.take(request.url.path) if self.config.enable_fault_injection else None
        try:
            response = await self._api_with_fault(request, handler, fault)
        except ApiError as error:
            response = error_response(error)
        except (_Dropped, ClientDisconnect):
            raise
        except Exception:  # a bug, not bad input: keep serving, say so loudly
            log.exception("unexpected error handling %s %s", request.method, request.url.path)
            response = error_response(ApiError(500, "internal_error", "sandbox bug; see its log"))
        self.requests_by_status[response.status_code] += 1
        if fault is not None and fault.action == "delay":
            await asyncio.sleep(fault.seconds)
        if fault is not None and fault.action == "close_after":
            await self._drop_connection(request)
        return response

    async def _api_with_fault(
        self, request: Request, handler: Handler, fault: Fault | None
    ) -> Response:
        if fault is not None and fault.status is not None:
            headers = {}
            if fault.retry_after is not None:
                headers["Retry-After"] = _retry_after_header(fault.retry_after)
            raise ApiError(
                fault.status,
                "injected_fault",
                f"sandbox fault injection answered {fault.status}",
                headers=headers,
            )
        if fault is not None and fault.action == "close_before":
            with contextlib.suppress(ApiError):
                await self._read_body(request)
            await self._drop_connection(request)
        tenant = self._authenticate(request)
        if self.limiter is not None:
            wait = self.limiter.take(request.headers.get("x-api-key", ""))
            if wait > 0:
                raise ApiError(
                    429,
                    "rate_limited",
                    f"more than {self.config.rate_limit_rps} requests per second for this key",
                    headers={"Retry-After": _retry_after_header(wait)},
                )
        response = await handler(request, tenant)
        if fault is not None and fault.action == "tamper_proof" and response.status_code == 200:
            body = orjson.loads(response.body)
            tamper_with_proof(body)
            response = json_response(body, response.status_code)
        return response

    async def _drop_connection(self, request: Request) -> None:
        transport = request.scope.get("extensions", {}).get(TRANSPORT_SCOPE_KEY)
        if transport is None:
            raise ApiError(
                500, "fault_unsupported", "dropping connections needs SandboxHttpProtocol"
            )
        transport.abort()
        # Let the protocol see connection_lost, so uvicorn does not answer 500 for us.
        await asyncio.sleep(0)
        raise _Dropped

    def _authenticate(self, request: Request) -> str:
        key = request.headers.get("x-api-key")
        if not key:
            raise ApiError(
                401,
                "unauthorized",
                "X-API-Key header is missing or empty",
                [FieldError("X-API-Key", "required header")],
            )
        tenant = self.config.api_keys.get(key)
        if tenant is None:
            raise ApiError(
                401,
                "unauthorized",
                "X-API-Key is not a known API key",
                [FieldError("X-API-Key", "unknown API key")],
            )
        return tenant

    async def _read_body(self, request: Request) -> bytes:
        """The request body, refused with 413 as soon as it is known to exceed the limit."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        too_big = ApiError(
            413,
            "payload_too_large",
            f"request body exceeds the {limit}-byte limit",
            [FieldError("body", f"larger than {limit} bytes")],
        )
        if declared is not None:
            if not (declared.strip().isascii() and declared.strip().isdigit()):
                raise ApiError(
                    400,
                    "invalid_header",
                    "Content-Length must be a non-negative integer",
                    [FieldError("Content-Length", "not an integer")],
                )
            if int(declared) > limit:
                raise too_big
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    async def _read_json(self, request: Request) -> Any:
        content_type = request.headers.get("content-type", "")
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            raise ApiError(
                415,
                "unsupported_media_type",
                f"Content-Type must be application/json, got {content_type or 'nothing'!r}",
                [FieldError("Content-Type", "must be application/json")],
            )
        raw = await self._read_body(request)
        if not raw:
            raise ApiError(
                400, "invalid_json", "request body is empty", [FieldError("body", "empty")]
            )
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(
                400,
                "invalid_json",
                f"request body is not valid JSON: {exc}",
                [FieldError("body", str(exc))],
            ) from exc

    # -- Certyo API -------------------------------------------------------------------

    def _note_leniencies(self, request: Request, noted: Leniencies) -> None:
        """Log, once per request, what was accepted only because the reference allows it."""
        if not noted:
            return
        self.leniencies.update(noted)
        described = "; ".join(f"{count} × {what}" for what, count in sorted(noted.items()))
        log.warning(
            "%s accepted beyond the strict form (start with --strict to refuse): %s",
            request.url.path,
            described,
        )

    async def _ingest_one(self, request: Request, tenant: str) -> Response:
        noted: Leniencies = Counter()
        record = validate_single(
            await self._read_json(request), tenant, strict=self.config.strict, leniencies=noted
        )
        self._note_leniencies(request, noted)
        outcome = self._store.ingest(tenant, [record], time.time(), bulk=False)
        self.idempotent_replays += outcome.replayed
        self._flush_full_batches(time.time())
        return json_response(outcome.results[0], 202)

    async def _ingest_bulk(self, request: Request, tenant: str) -> Response:
        _, raw_records = bulk_envelope(await self._read_json(request), tenant)
        noted: Leniencies = Counter()
        records = validate_bulk(raw_records, tenant, strict=self.config.strict, leniencies=noted)
        self._note_leniencies(request, noted)
        outcome = self._store.ingest(tenant, records, time.time(), bulk=True)
        self.idempotent_replays += outcome.replayed
        self._flush_full_batches(time.time())
        return json_response(
            {
                "tenantId": tenant,
                "accepted": outcome.accepted,
                "replayed": outcome.replayed,
                "results": outcome.results,
            },
            202,
        )

    async def _verify(self, request: Request, tenant: str) -> Response:
        body = await self._read_json(request)
        if not isinstance(body, dict):
            raise ApiError(400, "validation_failed", "body must be a JSON object")
        errors = []
        for name in ("tenantId", "database", "collection", "recordId"):
            value = body.get(name)
            if not isinstance(value, str) or not value:
                errors.append(FieldError(name, f"{name} is required and must be a string"))
        wanted_hash = body.get("recordHash")
        if wanted_hash is not None and not isinstance(wanted_hash, str):
            errors.append(FieldError("recordHash", "recordHash must be a string when given"))
        if errors:
            raise ApiError(
                400, "validation_failed", f"{errors[0].field}: {errors[0].message}", errors
            )
        if body["tenantId"] != tenant:
            raise ApiError(
                403,
                "tenant_forbidden",
                "tenantId does not belong to this API key",
                [FieldError("tenantId", "tenantId does not belong to this API key")],
            )
        version = self._store.find_version(
            tenant, body["database"], body["collection"], body["recordId"], wanted_hash
        )
        if version is None:
            what = "record" if wanted_hash is None else "record version with that recordHash"
            raise ApiError(
                404, "not_found", f"no such {what}", [FieldError("recordId", "not found")]
            )
        return json_response(
            verify_body(
                version,
                time.time(),
                self.config.anchor_delay_seconds,
                on_chain=self.chain is not None,
            )
        )

    async def _query(self, request: Request, tenant: str) -> Response:
        params = request.query_params
        allowed = {*QUERY_FILTERS, "limit", "cursor", "tenantId"}
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise ApiError(
                400,
                "validation_failed",
                f"unknown query parameter {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}",
                [FieldError(name, "unknown query parameter") for name in unknown],
            )
        if "tenantId" in params and params["tenantId"] != tenant:
            raise ApiError(403, "tenant_forbidden", "tenantId does not belong to this API key")
        limit = DEFAULT_QUERY_LIMIT
        if "limit" in params:
            text = params["limit"]
            if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_QUERY_LIMIT:
                raise ApiError(
                    400,
                    "validation_failed",
                    f"limit must be an integer from 1 to {MAX_QUERY_LIMIT}, got {text!r}",
                    [FieldError("limit", f"1..{MAX_QUERY_LIMIT}")],
                )
            limit = int(text)
        after = decode_cursor(params["cursor"]) if params.get("cursor") else 0
        filters = {name: params[name] for name in QUERY_FILTERS if params.get(name)}
        records, last_seq = self._store.query(tenant, filters, after, limit)
        next_cursor = encode_cursor(last_seq) if last_seq is not None else None
        return json_response({"records": records, "nextCursor": next_cursor})

    # -- anchoring --------------------------------------------------------------------

    @property
    def _store(self) -> SandboxStore:
        if self.store is None:
            raise ApiError(503, "not_ready", "sandbox is starting or stopping")
        return self.store

    def _flush_full_batches(self, now: float) -> None:
        size = self.config.flush_records
        while self._store.pending_records >= size:
            self._store.flush(now, size)

    def _flush_due(self, now: float) -> None:
        """Flush full batches, and everything pending once the oldest record is old enough."""
        self._flush_full_batches(now)
        store = self._store
        oldest = store.oldest_pending_ts
        while oldest is not None and now - oldest >= self.config.flush_seconds:
            store.flush(now, self.config.flush_records)
            oldest = store.oldest_pending_ts

    async def _anchor_loop(self) -> None:
        interval = min(max(self.config.flush_seconds / 4, 0.02), 1.0)
        while True:
            await asyncio.sleep(interval)
            try:
                self._flush_due(time.time())
            except Exception:  # keep anchoring alive; the next tick retries
                log.exception("anchoring flush failed")
            await self._anchor_on_chain()

    async def _anchor_on_chain(self) -> int:
        """Send every flushed batch not yet on chain; returns how many were anchored.

        A chain that cannot be reached leaves the batches for the next tick: their records
        stay `batched`, never `anchored`.
        """
        if self.chain is None or self._chain_lock is None:
            return 0
        anchored = 0
        async with self._chain_lock:
            for batch_id, root in self._store.batches_off_chain():
                try:
                    result = await asyncio.to_thread(self.chain.anchor, root)
                except (ChainRpcError, ValueError, KeyError, TypeError) as exc:
                    if self.chain_failures == 0:
                        log.warning("anchoring on %s failed (will retry): %s", self.chain.url, exc)
                    self.chain_failures += 1
                    break
                if self.chain_failures:
                    log.info("anchoring on %s works again", self.chain.url)
                self.chain_failures = 0
                self._store.record_chain_anchor(
                    batch_id,
                    result.chain_id,
                    result.transaction_hash,
                    result.block_number,
                    time.time(),
                )
                anchored += 1
        return anchored

    # -- controls ---------------------------------------------------------------------

    async def _healthz(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def _stats(self, request: Request) -> Response:
        store = self._store
        return json_response(
            {
                "requests_by_status": {
                    str(k): v for k, v in sorted(self.requests_by_status.items())
                },
                "records_stored": store.records_stored,
                "batches_anchored": store.batches_anchored,
                "idempotent_replays": self.idempotent_replays,
                "pending_records": store.pending_records,
                "leniencies": dict(sorted(self.leniencies.items())),
                # Keys are secrets: the most concurrent requests of any one key, per tenant.
                "max_concurrent_requests_per_key": self._max_concurrent_by_tenant(),
                **(
                    {
                        "chain_rpc": self.chain.url,
                        "batches_off_chain": len(store.batches_off_chain()),
                        "chain_failures": self.chain_failures,
                    }
                    if self.chain is not None
                    else {}
                ),
            }
        )

    def _max_concurrent_by_tenant(self) -> dict[str, int]:
        by_tenant: dict[str, int] = {}
        for key, most in self._max_in_flight.items():
            tenant = self.config.api_keys.get(key)
            if tenant is not None:
                by_tenant[tenant] = max(by_tenant.get(tenant, 0), most)
        return dict(sorted(by_tenant.items()))

    async def _add_faults(self, request: Request) -> Response:
        faults = parse_faults(await self._read_json(request))
        self.faults.extend(faults)
        return json_response({"faults": self.faults.pending()})

    async def _list_faults(self, request: Request) -> Response:
        return json_response({"faults": self.faults.pending()})

    async def _clear_faults(self, request: Request) -> Response:
        self.faults.clear()
        return json_response({"faults": []})

    async def _force_flush(self, request: Request) -> Response:
        flushed = 0
        while self._store.pending_records:
            flushed += self._store.flush(time.time(), self.config.flush_records)
        body: dict[str, Any] = {
            "flushed": flushed,
            "batches_anchored": self._store.batches_anchored,
        }
        if self.chain is not None:
            await self._anchor_on_chain()
            body["batches_off_chain"] = len(self._store.batches_off_chain())
        return json_response(body)


def _retry_after_header(seconds: float) -> str:
    """Retry-After carries whole seconds (RFC 9110), rounded up so clients never come early."""
    return str(max(1, math.ceil(seconds))) if seconds > 0 else "0"
