"""Scripted faults, rate limiting and hostile HTTP input against certyo-sandbox."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from fixtures.sandbox import TENANT_A, TENANT_B, TEST_KEY_A, TEST_KEY_B
from fixtures.sandbox import post_json as post
from fixtures.sandbox import sample_record as make_record

RECORDS = "/api/v1/records"
BULK = "/api/v1/records/bulk"


def raw_http(sandbox, request: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes on a fresh socket and return everything the server answers."""
    with socket.create_connection(("127.0.0.1", sandbox.port), timeout=timeout) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(raw_response: bytes) -> int:
    return int(raw_response.split(b" ", 2)[1])


def test_503_three_times_then_success_without_processing(sandbox):
    sandbox.script_faults([{"status": 503, "times": 3}])
    statuses = [post(sandbox, RECORDS, make_record()).status_code for _ in range(4)]
    assert statuses == [503, 503, 503, 202]
    stats = sandbox.stats()
    assert stats["records_stored"] == 1
    assert stats["requests_by_status"] == {"202": 1, "503": 3}


def test_429_fault_carries_retry_after(sandbox):
    sandbox.script_faults([{"status": 429, "retry_after": 2}])
    response = post(sandbox, RECORDS, make_record())
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "2"
    assert response.json()["error"] == "injected_fault"
    assert sandbox.stats()["records_stored"] == 0


def test_fault_with_a_path_waits_for_that_path(sandbox):
    sandbox.script_faults([{"path": BULK, "status": 500}])
    assert post(sandbox, RECORDS, make_record()).status_code == 202
    bulk = {"tenantId": TENANT_A, "records": [make_record("b")]}
    assert post(sandbox, BULK, bulk).status_code == 500
    assert post(sandbox, BULK, bulk).status_code == 202


def test_faults_apply_in_order_and_can_be_cleared(sandbox):
    sandbox.script_faults([{"status": 502}, {"status": 504}])
    assert post(sandbox, RECORDS, make_record()).status_code == 502
    sandbox.clear_faults()
    assert post(sandbox, RECORDS, make_record()).status_code == 202


def test_close_before_drops_the_connection_and_stores_nothing(sandbox):
    sandbox.script_faults([{"action": "close_before"}])
    with pytest.raises(requests.ConnectionError):
        post(sandbox, RECORDS, make_record(idempotencyKey="k1"))
    assert sandbox.stats()["records_stored"] == 0
    retry = post(sandbox, RECORDS, make_record(idempotencyKey="k1"))
    assert retry.status_code == 202
    assert retry.json()["idempotencyReplayed"] is False


def test_close_after_stores_the_record_so_the_retry_is_a_replay(sandbox):
    sandbox.script_faults([{"path": BULK, "action": "close_after"}])
    bulk = {
        "tenantId": TENANT_A,
        "records": [make_record(f"r{i}", idempotencyKey=f"k{i}") for i in range(3)],
    }
    with pytest.raises(requests.ConnectionError):
        post(sandbox, BULK, bulk)
    assert sandbox.stats()["records_stored"] == 3
    retry = post(sandbox, BULK, bulk).json()
    assert (retry["accepted"], retry["replayed"]) == (0, 3)
    assert sandbox.stats()["records_stored"] == 3


def test_delay_makes_a_client_read_timeout_but_the_record_is_stored(sandbox):
    sandbox.script_faults([{"action": "delay", "seconds": 1.5}])
    with pytest.raises(requests.ReadTimeout):
        post(sandbox, RECORDS, make_record(idempotencyKey="slow"), timeout=0.3)
    assert sandbox.stats()["records_stored"] == 1
    assert post(sandbox, RECORDS, make_record(idempotencyKey="slow")).json()["idempotencyReplayed"]


@pytest.mark.parametrize(
    "entry",
    [{"status": 99}, {"status": 204}, {"status": 302}, {"action": "explode"},
     {"status": 503, "action": "delay"},
     {"times": 0, "status": 503}, {"action": "delay", "seconds": -1},
     {"path": "api/v1/records", "status": 503}, "503"],
)  # fmt: skip
def test_bad_fault_entries_are_400(sandbox, entry):
    response = requests.post(
        sandbox.base_url + "/_sandbox/faults", json={"faults": [entry]}, timeout=5
    )
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "faults[0]"


def test_fault_endpoints_are_404_without_fault_injection(sandbox_factory):
    sandbox = sandbox_factory(enable_fault_injection=False)
    for method in ("POST", "DELETE"):
        response = requests.request(
            method, sandbox.base_url + "/_sandbox/faults", json={"faults": []}, timeout=5
        )
        assert response.status_code == 404
    assert requests.post(sandbox.base_url + "/_sandbox/flush", timeout=5).status_code == 404


def test_rate_limit_answers_429_with_retry_after_per_key(sandbox_factory):
    sandbox = sandbox_factory(rate_limit_rps=0.2)  # one request, then one every 5 s
    assert post(sandbox, RECORDS, make_record()).status_code == 202
    limited = post(sandbox, RECORDS, make_record("r2"))
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"] == "rate_limited"
    assert sandbox.stats()["records_stored"] == 1
    other_key = post(sandbox, RECORDS, make_record(tenant="tenant-b"), key="cty_sandbox_test_key_b")
    assert other_key.status_code == 202


def test_body_over_the_limit_is_413_with_content_length(sandbox_factory):
    sandbox = sandbox_factory(max_body_bytes=64 * 1024)
    big = make_record(recordPayload={"blob": "x" * 100_000})
    response = post(sandbox, RECORDS, big)
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    assert sandbox.stats()["records_stored"] == 0
    # The connection stays usable: the refused body was drained, not left in the socket.
    assert post(sandbox, RECORDS, make_record()).status_code == 202


def test_chunked_body_over_the_limit_is_413(sandbox_factory):
    sandbox = sandbox_factory(max_body_bytes=64 * 1024)

    def chunks():
        yield b'{"tenantId": "tenant-a", "recordPayload": {"blob": "'
        for _ in range(50):
            yield b"x" * 8192
        yield b'"}}'

    response = requests.post(
        sandbox.base_url + RECORDS,
        data=chunks(),
        headers={"X-API-Key": TEST_KEY_A, "Content-Type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 413
    assert sandbox.stats()["records_stored"] == 0


def test_huge_declared_content_length_is_refused_before_any_body_arrives(sandbox_factory):
    sandbox = sandbox_factory(max_body_bytes=64 * 1024)
    with socket.create_connection(("127.0.0.1", sandbox.port), timeout=5) as sock:
        sock.sendall(
            b"POST /api/v1/records HTTP/1.1\r\nHost: x\r\nX-API-Key: " + TEST_KEY_A.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n{"
        )  # fmt: skip
        head = sock.recv(65536)
    assert status_of(head) == 413


def test_content_length_shorter_than_the_body_never_gives_500(sandbox):
    body = b'{"tenantId": "tenant-a", "database": "d"}'
    answer = raw_http(
        sandbox,
        b"POST /api/v1/records HTTP/1.1\r\nHost: x\r\nX-API-Key: " + TEST_KEY_A.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n" + body,
    )  # fmt: skip
    assert status_of(answer) == 400
    assert b" 500 " not in answer


@pytest.mark.parametrize(
    ("header", "expected"),
    [(b"X-API-Key:", 401), (b"X-API-Key: \xff\xfe", 401), (b"Content-Type:", 415)],
)
def test_headers_without_a_value_never_give_500(sandbox, header, expected):
    headers = [b"Host: x", b"Content-Type: application/json", b"X-API-Key: " + TEST_KEY_A.encode()]
    name = header.split(b":")[0]
    headers = [h for h in headers if not h.startswith(name)] + [header]
    body = b'{"tenantId": "tenant-a"}'
    request = (
        b"POST /api/v1/records HTTP/1.1\r\n"
        + b"\r\n".join(headers)
        + b"\r\nConnection: close\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    assert status_of(raw_http(sandbox, request)) == expected


def test_garbage_request_line_and_unknown_paths_are_not_500(sandbox):
    assert status_of(raw_http(sandbox, b"NOT HTTP AT ALL\r\n\r\n")) == 400
    response = requests.get(
        sandbox.base_url + "/api/v1/nothing", headers={"X-API-Key": TEST_KEY_A}, timeout=5
    )
    assert response.status_code == 404
    assert requests.put(sandbox.base_url + RECORDS, timeout=5).status_code == 405


def test_client_hanging_up_mid_body_is_not_a_server_error(sandbox):
    with socket.create_connection(("127.0.0.1", sandbox.port), timeout=5) as sock:
        sock.sendall(
            b"POST /api/v1/records HTTP/1.1\r\nHost: x\r\nX-API-Key: " + TEST_KEY_A.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"tenantId\""
        )  # fmt: skip
    assert post(sandbox, RECORDS, make_record()).status_code == 202
    assert "500" not in sandbox.stats()["requests_by_status"]


def test_stats_report_the_most_concurrent_requests_of_each_key_by_tenant(sandbox):
    assert sandbox.stats()["max_concurrent_requests_per_key"] == {}
    # Each request is held 1 s, so the three of key A overlap; key B's two run one by one.
    sandbox.script_faults([{"path": RECORDS, "action": "delay", "seconds": 1.0, "times": 5}])
    with ThreadPoolExecutor(3) as pool:
        together = [pool.submit(post, sandbox, RECORDS, make_record(f"a{i}")) for i in range(3)]
        assert [f.result().status_code for f in together] == [202] * 3
    for i in range(2):
        response = post(sandbox, RECORDS, make_record(f"b{i}", tenant=TENANT_B), TEST_KEY_B)
        assert response.status_code == 202
    post(sandbox, RECORDS, make_record("x"), "not-a-key")  # unknown keys are not reported
    stats = sandbox.stats()
    assert stats["max_concurrent_requests_per_key"] == {TENANT_A: 3, TENANT_B: 1}
    assert TEST_KEY_A not in str(stats) and TEST_KEY_B not in str(stats)
