"""Settings of one sandbox instance, shared by the CLI, the app and the test servers."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_API_KEY = "cty_sandbox_dev_key"  # noqa: S105 - a published development key
DEFAULT_TENANT = "sandbox-tenant"
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


@dataclass
class SandboxConfig:
    """What a sandbox accepts and how fast it anchors.

    `api_keys` maps API key to tenant. `db_path` is a SQLite file, or ":memory:" for a
    database that lives as long as the server. A batch is flushed when `flush_records`
    records are pending or the oldest pending record is `flush_seconds` old; its records
    count as anchored on chain `anchor_delay_seconds` after the flush. With `strict`, requests
    that the Certyo reference allows but a careful client avoids are refused instead of
    accepted with a warning (see `certyo_sandbox.validation`). With `chain_rpc` (a JSON-RPC
    URL), each batch root is sent to that EVM chain in a real transaction, and a record counts
    as anchored once that transaction is mined (and `anchor_delay_seconds` have passed).
    """

    api_keys: dict[str, str] = field(default_factory=lambda: {DEFAULT_API_KEY: DEFAULT_TENANT})
    db_path: str = ":memory:"
    flush_records: int = 1000
    flush_seconds: float = 60.0
    anchor_delay_seconds: float = 0.0
    rate_limit_rps: float | None = None
    enable_fault_injection: bool = False
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    strict: bool = False
    chain_rpc: str | None = None

    def __post_init__(self) -> None:
        if not self.api_keys:
            raise ValueError("api_keys must hold at least one KEY -> TENANT entry")
        for key, tenant in self.api_keys.items():
            if not key or not tenant:
                raise ValueError("api_keys entries need a non-empty key and tenant")
        if self.flush_records < 1:
            raise ValueError(f"flush_records must be at least 1, got {self.flush_records}")
        if self.flush_seconds <= 0:
            raise ValueError(f"flush_seconds must be positive, got {self.flush_seconds}")
        if self.anchor_delay_seconds < 0:
            raise ValueError("anchor_delay_seconds must not be negative")
        if self.rate_limit_rps is not None and self.rate_limit_rps <= 0:
            raise ValueError(f"rate_limit_rps must be positive, got {self.rate_limit_rps}")
        if self.chain_rpc is not None and not self.chain_rpc.startswith(("http://", "https://")):
            raise ValueError(f"chain_rpc must be an http(s) URL, got {self.chain_rpc!r}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")

    def __repr__(self) -> str:
        # API keys are secrets: show only which tenants are configured.
        tenants = sorted(set(self.api_keys.values()))
        return (
            f"SandboxConfig(tenants={tenants}, db_path={self.db_path!r},"
            f" flush_records={self.flush_records}, flush_seconds={self.flush_seconds},"
            f" anchor_delay_seconds={self.anchor_delay_seconds},"
            f" rate_limit_rps={self.rate_limit_rps},"
            f" enable_fault_injection={self.enable_fault_injection},"
            f" max_body_bytes={self.max_body_bytes}, strict={self.strict},"
            f" chain_rpc={self.chain_rpc!r})"
        )
