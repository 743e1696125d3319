"""Property: whatever JSON a client POSTs to the sandbox's ingest endpoints, the answer is a
202 or a 4xx whose JSON error body names the offending field. Never a 5xx.

(The sanitizer's own Hypothesis property is in tests/sanitize/test_sanitize_properties.py.)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from fixtures.sandbox import TEST_KEY_A, sample_record, sandbox_test_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certyo_sandbox.server import SandboxServer
from certyo_sandbox.validation import RECORD_FIELDS

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip
field_names = st.sampled_from(sorted(RECORD_FIELDS)) | st.text(max_size=8)
# Mostly-valid records with a few fields replaced or added, and arbitrary objects.
records = st.one_of(
    st.builds(
        lambda override: {**sample_record(), **override},
        st.dictionaries(field_names, json_values, max_size=3),
    ),
    st.dictionaries(field_names, json_values, max_size=8),
    json_values,
)
single_bodies = records
bulk_bodies = st.one_of(
    st.fixed_dictionaries(
        {"tenantId": st.sampled_from(["tenant-a", "tenant-b", ""]) | json_values,
         "records": st.lists(records, max_size=4) | json_values}
    ),
    json_values,
)  # fmt: skip


@pytest.fixture(scope="module")
def shared_sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(sandbox_test_config(enable_fault_injection=False)) as server:
        yield server


def _check(response: requests.Response) -> None:
    assert response.status_code < 500, response.text
    body = response.json()
    if response.status_code == 202:
        return
    assert 400 <= response.status_code < 500
    assert isinstance(body.get("error"), str) and body.get("message")
    fields = [e.get("field") for e in body.get("errors") or []]
    # The field's own name, which can be "" when the offending key is the empty string.
    assert fields and all(isinstance(f, str) for f in fields), body


_settings = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_settings
@given(body=single_bodies)
def test_any_single_record_body_is_202_or_a_4xx_naming_a_field(shared_sandbox, body):
    url = shared_sandbox.base_url + "/api/v1/records"
    _check(requests.post(url, json=body, headers={"X-API-Key": TEST_KEY_A}, timeout=10))


@_settings
@given(body=bulk_bodies)
def test_any_bulk_body_is_202_or_a_4xx_naming_a_field(shared_sandbox, body):
    url = shared_sandbox.base_url + "/api/v1/records/bulk"
    _check(requests.post(url, json=body, headers={"X-API-Key": TEST_KEY_A}, timeout=10))
