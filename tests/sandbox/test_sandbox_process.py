"""certyo-sandbox as a separate process: the CLI, the subprocess wrapper and its cleanup."""

from __future__ import annotations

import os
import subprocess
import sys

import requests
from fixtures.sandbox import TENANT_A, TEST_KEY_A, post_json, sample_record, sandbox_test_config

from certyo_sandbox.config import DEFAULT_API_KEY, DEFAULT_TENANT
from certyo_sandbox.server import SandboxProcess


def test_subprocess_serves_the_api_and_leaves_no_process_behind(tmp_path):
    config = sandbox_test_config(db_path=str(tmp_path / "sandbox.db"))
    with SandboxProcess(config) as sandbox:
        pid = sandbox.pid
        assert requests.get(sandbox.base_url + "/healthz", timeout=5).json() == {"status": "ok"}
        response = post_json(sandbox, "/api/v1/records", sample_record())
        assert response.status_code == 202
        assert response.json()["tenantId"] == TENANT_A
        assert sandbox.stats()["records_stored"] == 1
        # The API keys reach the child through its environment, not its command line.
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            assert TEST_KEY_A.encode() not in cmdline.read()
    assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_cli_help_names_the_development_key_and_database_default():
    result = subprocess.run(
        [sys.executable, "-m", "certyo_sandbox.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert DEFAULT_API_KEY in result.stdout
    assert DEFAULT_TENANT in result.stdout
    assert "certyo-sandbox.db" in result.stdout


def test_cli_rejects_a_malformed_api_key_without_echoing_it():
    result = subprocess.run(
        [sys.executable, "-m", "certyo_sandbox.cli", "--api-key", "cty_secret_no_tenant"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "KEY=TENANT" in result.stderr
    assert "cty_secret_no_tenant" not in result.stderr + result.stdout


def test_subprocess_from_cli_arguments_uses_the_development_key():
    with SandboxProcess(["--flush-records", "2", "--enable-fault-injection"]) as sandbox:
        records = [sample_record(f"r{i}", tenant=DEFAULT_TENANT) for i in range(3)]
        response = post_json(
            sandbox,
            "/api/v1/records/bulk",
            {"tenantId": DEFAULT_TENANT, "records": records},
            key=DEFAULT_API_KEY,
        )
        assert response.status_code == 202
        assert sandbox.stats()["batches_anchored"] == 1
