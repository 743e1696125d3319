"""The Dagster resource for Certyo: configuration in the UI, one pooled client per process.

Dagster builds resources for every run and every sensor tick. A new `requests.Session` each
time would throw away the connection pool (pitfall 6), so clients are cached per process and
per distinct configuration.
"""

from __future__ import annotations

import hashlib
import os

import dagster as dg
from pydantic import Field

from certyo_dagster.clients import ProcessClients
from certyo_dagster.settings import ConfigError
from certyo_dagster.ship.client import CertyoClient

INSECURE_HTTP_ENV = "CERTYO_ALLOW_INSECURE_HTTP"
BASE_URL_ENV = "CERTYO_BASE_URL"
TENANT_ID_ENV = "CERTYO_TENANT_ID"

_clients: ProcessClients[CertyoClient] = ProcessClients()


def insecure_http_from_env() -> bool:
    """True when CERTYO_ALLOW_INSECURE_HTTP is 1/true/yes."""
    return os.environ.get(INSECURE_HTTP_ENV, "").strip().lower() in ("1", "true", "yes")


class CertyoResource(dg.ConfigurableResource):
    """The Certyo API for one tenant. `api_key` comes from `EnvVar("CERTYO_API_KEY")`."""

    base_url: str = Field(
        description="Certyo API root, e.g. https://www.certyos.com. Plain http is refused "
        "unless the host is loopback or allow_insecure_http is set."
    )
    api_key: str = Field(
        repr=False,
        description="Certyo API key, sent only as the X-API-Key header. Configure it as "
        'EnvVar("CERTYO_API_KEY"), never as a literal.',
    )
    tenant_id: str = Field(description="Certyo tenant that every record is ingested under.")
    connect_timeout: float = Field(
        default=5.0, description="Seconds to wait for a TCP/TLS connection to Certyo."
    )
    read_timeout: float = Field(
        default=60.0,
        description="Seconds to wait for a response; a timed-out request is retried, and the "
        "retry is de-duplicated by its idempotency keys.",
    )
    max_retries: int = Field(
        default=3,
        description="Retries after a 429, 5xx, dropped connection or timeout, before failing.",
    )
    backoff_initial_seconds: float = Field(
        default=1.0,
        description="Upper bound of the first retry's random (full-jitter) delay; doubles on "
        "each further retry.",
    )
    backoff_max_seconds: float = Field(
        default=30.0, description="Largest delay between two retries without Retry-After."
    )
    max_retry_after_seconds: float = Field(
        default=60.0, description="Longest Retry-After from Certyo that is honoured as given."
    )
    pool_maxsize: int = Field(
        default=16,
        description="HTTP connections kept open to Certyo; at least the number of bulk posts "
        "in flight at once.",
    )
    allow_insecure_http: bool = Field(
        default=False,
        description="Allow plain http to a non-loopback host (the API key then crosses the "
        f"network unencrypted). Also enabled by {INSECURE_HTTP_ENV}=1.",
    )

    def get_client(self) -> CertyoClient:
        """The process-wide client for this configuration, created on first use.

        ConfigError, in one line, when the base URL or the tenant is not configured.
        """
        if not self.base_url.strip():
            raise ConfigError(
                f"{BASE_URL_ENV} is not set: set it to your Certyo API root, for example "
                "https://www.certyos.com (make run sets it to its local sandbox)"
            )
        if not self.tenant_id.strip():
            raise ConfigError(
                f"{TENANT_ID_ENV} is not set: set it to the Certyo tenant of CERTYO_API_KEY"
            )
        allow_insecure = self.allow_insecure_http or insecure_http_from_env()
        settings = {
            "connect_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
            "max_retries": self.max_retries,
            "backoff_initial_seconds": self.backoff_initial_seconds,
            "backoff_max_seconds": self.backoff_max_seconds,
            "max_retry_after_seconds": self.max_retry_after_seconds,
            "pool_maxsize": self.pool_maxsize,
            "allow_insecure_http": allow_insecure,
        }
        # The cache key holds a digest of the key, not the key itself.
        key_digest = hashlib.sha256(self.api_key.encode()).hexdigest()
        cache_key = (self.base_url, key_digest, self.tenant_id, *sorted(settings.items()))
        return _clients.get(
            cache_key,
            lambda: CertyoClient(self.base_url, self.api_key, self.tenant_id, **settings),
        )


def close_all_clients() -> None:
    """Close and forget every cached client (tests and process shutdown)."""
    _clients.close_all()
