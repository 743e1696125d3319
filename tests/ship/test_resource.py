"""CertyoResource: one client per process and configuration, and no key in any error."""

from __future__ import annotations

import dagster as dg
import pytest

from certyo_dagster.ship.resource import CertyoResource, close_all_clients

KEY = "cty_live_resource_test_secret_9876"


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.delenv("CERTYO_ALLOW_INSECURE_HTTP", raising=False)
    close_all_clients()
    yield
    close_all_clients()


def resource(**overrides) -> CertyoResource:
    settings = {"base_url": "https://certyo.example", "api_key": KEY, "tenant_id": "tenant-a"}
    settings.update(overrides)
    return CertyoResource(**settings)


def test_same_configuration_shares_one_client():
    first, second = resource(), resource()
    assert first is not second
    assert first.get_client() is second.get_client()


def test_different_configuration_gets_its_own_client():
    base = resource().get_client()
    assert resource(tenant_id="tenant-b").get_client() is not base
    assert resource(api_key=KEY + "x").get_client() is not base
    assert resource(read_timeout=5.0).get_client() is not base


def test_settings_reach_the_client():
    client = resource(max_retries=5, pool_maxsize=4, connect_timeout=2.0).get_client()
    assert client.max_retries == 5
    assert client.retry.total == 5
    assert client._timeout == (2.0, 60.0)
    assert client._session.get_adapter("https://certyo.example")._pool_maxsize == 4


def test_repr_of_the_resource_hides_the_key():
    assert KEY not in repr(resource())
    assert KEY not in str(resource())


def test_plain_http_is_refused_without_echoing_the_key():
    with pytest.raises(ValueError, match="plain http") as info:
        resource(base_url="http://certyo.example").get_client()
    assert KEY not in str(info.value)
    assert KEY not in repr(info.value)


def test_insecure_http_can_be_allowed_by_flag_or_environment(monkeypatch):
    assert resource(base_url="http://certyo.example", allow_insecure_http=True).get_client()
    monkeypatch.setenv("CERTYO_ALLOW_INSECURE_HTTP", "1")
    assert resource(base_url="http://certyo.example").get_client()


def test_a_failing_run_shows_no_key_in_dagster_error_text(monkeypatch):
    monkeypatch.setenv("CERTYO_API_KEY", KEY)

    @dg.asset
    def certyo_probe(certyo: CertyoResource) -> None:
        certyo.get_client()

    certyo = CertyoResource(
        base_url="http://certyo.example", api_key=dg.EnvVar("CERTYO_API_KEY"), tenant_id="t"
    )
    result = dg.materialize([certyo_probe], resources={"certyo": certyo}, raise_on_error=False)
    assert not result.success
    failures = [e for e in result.all_events if e.is_step_failure]
    error_text = failures[0].event_specific_data.error.to_string()
    assert "plain http to a non-loopback host" in error_text
    assert KEY not in error_text


@pytest.mark.parametrize(
    ("setting", "variable"), [("base_url", "CERTYO_BASE_URL"), ("tenant_id", "CERTYO_TENANT_ID")]
)
def test_an_unset_base_url_or_tenant_is_a_one_line_configuration_error(setting, variable):
    from certyo_dagster.settings import ConfigError

    with pytest.raises(ConfigError) as caught:
        resource(**{setting: "  "}).get_client()
    message = str(caught.value)
    assert message.startswith(f"{variable} is not set")
    assert "\n" not in message and KEY not in message
