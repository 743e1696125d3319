"""`make run`'s launcher, without dagster dev: what it starts, what it configures, and that
stopping it leaves nothing running."""

from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path

import pytest
import requests

from certyo_dagster.source.mongo import close_all_clients, open_client
from certyo_demo.launcher import LaunchError, Stack, start_stack
from certyo_demo.servers import free_port

NOW = datetime(2026, 3, 1, 12, 30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone as far as the user is concerned.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


def _base_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "TMPDIR")
    return {k: os.environ[k] for k in keep if k in os.environ}


def test_unconfigured_launch_starts_sandbox_seed_and_churn_then_stops_them(tmp_path: Path) -> None:
    stack: Stack = start_stack(
        tmp_path / "run",
        dagster_port=free_port(),
        sandbox_port=free_port(),
        environ=_base_env(),
        seed_count=200,
        churn_interval=0.2,
        start_dagster=False,
        now=NOW,
    )
    pids = stack.pids()
    try:
        env = stack.env
        assert env["MONGO_URI"] == f"montydb://{tmp_path / 'run' / 'mongo'}"
        assert env["CERTYO_BASE_URL"] == stack.sandbox_url
        assert env["CERTYO_API_KEY"] == "cty_sandbox_dev_key"
        assert env["CERTYO_TENANT_ID"] == "sandbox-tenant"
        assert env["CERTYO_DEMO_MODE"] == "1"
        assert env["CERTYO_PARTITION_START"] == "2026-03-01T08:00"
        assert env["DAGSTER_HOME"] == str(tmp_path / "run" / "dagster_home")
        assert (tmp_path / "run" / "dagster_home" / "dagster.yaml").exists()
        assert stack.seeded == 200
        assert requests.get(f"{stack.sandbox_url}/_sandbox/stats", timeout=5).ok
        assert set(stack.processes) == {"sandbox", "churn"}
        close_all_clients()
        products = open_client(env["MONGO_URI"])["productdb"]["products"]
        assert products.count_documents({}) >= 200
        churn_log = tmp_path / "run" / "logs" / "churn.log"
        deadline = time.monotonic() + 60
        while "churn tick 2" not in churn_log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert products.count_documents({"updatedAt": {"$gt": NOW}}) > 0  # churn's edits
    finally:
        stack.stop()
        close_all_clients()
    assert not [pid for pid in pids if _alive(pid)]

    # A second launch reuses the store: no second seeding, same partition start.
    again = start_stack(
        tmp_path / "run",
        dagster_port=free_port(),
        sandbox_port=free_port(),
        environ=_base_env(),
        start_dagster=False,
    )
    again.stop()
    assert again.seeded == 0
    assert again.env["CERTYO_PARTITION_START"] == "2026-03-01T08:00"


def test_configured_launch_starts_neither_sandbox_nor_demo(tmp_path: Path) -> None:
    environ = {
        **_base_env(),
        "MONGO_URI": "mongodb://user:secret@db.example:27017/",
        "CERTYO_BASE_URL": "https://api.certyo.example",
        "CERTYO_API_KEY": "cty_live_abc",
        "CERTYO_TENANT_ID": "acme",
    }
    stack = start_stack(
        tmp_path / "run", dagster_port=free_port(), environ=environ, start_dagster=False
    )
    stack.stop()
    assert stack.processes == {} and stack.seeded == 0 and stack.sandbox_url is None
    assert stack.env["MONGO_URI"] == environ["MONGO_URI"]
    assert stack.env["CERTYO_API_KEY"] == "cty_live_abc"
    assert "CERTYO_DEMO_MODE" not in stack.env


def test_base_url_without_api_key_is_refused(tmp_path: Path) -> None:
    environ = {**_base_env(), "CERTYO_BASE_URL": "https://api.certyo.example"}
    with pytest.raises(LaunchError, match="CERTYO_API_KEY"):
        start_stack(tmp_path / "run", dagster_port=free_port(), environ=environ)


def test_base_url_without_tenant_is_refused(tmp_path: Path) -> None:
    """The product has no default tenant; the launcher says so before starting anything."""
    environ = {
        **_base_env(),
        "CERTYO_BASE_URL": "https://api.certyo.example",
        "CERTYO_API_KEY": "cty_live_abc",
    }
    with pytest.raises(LaunchError, match="CERTYO_TENANT_ID is not: set both"):
        start_stack(tmp_path / "run", dagster_port=free_port(), environ=environ)


def test_a_real_mongo_uri_without_a_certyo_endpoint_is_refused(tmp_path: Path) -> None:
    """The sandbox's fake anchoring must never write `anchored` into a real collection."""
    environ = {**_base_env(), "MONGO_URI": "mongodb://db.example:27017/"}
    with pytest.raises(LaunchError, match="MONGO_URI is set but CERTYO_BASE_URL is not"):
        start_stack(tmp_path / "run", dagster_port=free_port(), environ=environ)
    assert not (tmp_path / "run" / "certyo-sandbox.db").exists()
