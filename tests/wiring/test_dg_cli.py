"""The dg CLI works on this project: check, list, scaffold and dev, each as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import requests

from certyo_demo.servers import free_port, stop_process

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
DG = str(VENV_BIN / "dg")


def dg_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONGO_", "CERTYO_"))}
    # As if the project's virtual environment were activated (dg compares the two).
    env["VIRTUAL_ENV"] = str(VENV_BIN.parent)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DAGSTER_HOME"] = str(tmp_path / "dagster_home")
    (tmp_path / "dagster_home").mkdir(exist_ok=True)
    shutil.copy(REPO / "dagster.yaml", tmp_path / "dagster_home" / "dagster.yaml")
    env.update(extra)
    return env


def dg(args: list[str], env: dict[str, str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [DG, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_dg_check_defs_passes(tmp_path):
    result = dg(["check", "defs"], dg_env(tmp_path, CERTYO_COLLECTIONS="products,orders"))
    assert "All definitions loaded successfully" in result.stdout + result.stderr


def test_dg_list_defs_shows_each_collections_assets_jobs_sensors_and_schedules(tmp_path):
    env = dg_env(tmp_path, CERTYO_COLLECTIONS="products,orders:modifiedAt")
    listed = json.loads(dg(["list", "defs", "--json"], env).stdout)
    assets = {a["asset_key"] for a in listed["assets"]}
    for c in ("products", "orders"):
        assert {
            f"productdb/{c}",
            f"productdb/{c}/changed_documents",
            f"productdb/{c}/certyo_records",
            f"productdb/{c}/ingestion_receipts",
            f"productdb/{c}/anchoring_status",
            f"productdb/{c}/tamper_audit",
        } <= assets
    assert {j["name"] for j in listed["jobs"]} == {
        f"{job}_{c}" for c in ("products", "orders") for job in ("ingest", "verify", "tamper_audit")
    }
    assert {s["name"] for s in listed["sensors"]} == {
        "products_change_sensor",
        "orders_change_sensor",
        "products_proof_bundles_automation",
        "orders_proof_bundles_automation",
    }
    assert {s["name"]: s["cron_schedule"] for s in listed["schedules"]} == {
        "ingest_products_hourly": "5 * * * *",
        "verify_products_schedule": "*/2 * * * *",
        "tamper_audit_products_schedule": "30 3 * * *",
        "ingest_orders_hourly": "5 * * * *",
        "verify_orders_schedule": "*/2 * * * *",
        "tamper_audit_orders_schedule": "30 3 * * *",
    }
    assert {r["name"] for r in listed["resources"]} >= {"mongo", "certyo"}
    checks = {c["key"] for c in listed["asset_checks"]}
    assert "productdb/orders/anchoring_status:no_failed_documents" in checks


def test_the_component_is_listed_and_scaffolds_into_a_project(tmp_path):
    env = dg_env(tmp_path)
    listed = json.loads(dg(["list", "components", "--json"], env).stdout)
    assert "certyo_dagster.CertyoCollection" in {c["key"] for c in listed["items"]}

    # A project of the user's own that uses the installed component type.
    project = tmp_path / "shop"
    (project / "shop" / "defs").mkdir(parents=True)
    (project / "shop" / "__init__.py").write_text("")
    (project / "shop" / "defs" / "__init__.py").write_text("")
    (project / "shop" / "definitions.py").write_text(
        textwrap.dedent(
            """\
            from pathlib import Path

            import dagster as dg

            from certyo_dagster.ship.resource import CertyoResource
            from certyo_dagster.source.mongo import MongoResource


            @dg.definitions
            def defs():
                resources = {
                    "mongo": MongoResource(uri=dg.EnvVar("MONGO_URI"), database="shop"),
                    "certyo": CertyoResource(
                        base_url="https://certyo.invalid",
                        api_key=dg.EnvVar("CERTYO_API_KEY"),
                        tenant_id="shop",
                    ),
                }
                return dg.Definitions.merge(
                    dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
                    dg.Definitions(resources=resources),
                )
            """
        )
    )
    (project / "pyproject.toml").write_text(
        textwrap.dedent(
            """\
            [project]
            name = "shop"
            version = "0"

            [tool.dg]
            directory_type = "project"

            [tool.dg.project]
            root_module = "shop"
            """
        )
    )
    env["PYTHONPATH"] = str(project)
    dg(["scaffold", "defs", "certyo_dagster.CertyoCollection", "orders"], env, cwd=project)
    written = (project / "shop" / "defs" / "orders" / "defs.yaml").read_text()
    assert "type: certyo_dagster.CertyoCollection" in written
    assert "collection: orders" in written

    dg(["check", "defs"], env, cwd=project)
    listed = json.loads(dg(["list", "defs", "--json"], env, cwd=project).stdout)
    assert "productdb/orders/ingestion_receipts" in {a["asset_key"] for a in listed["assets"]}
    assert "orders_change_sensor" in {s["name"] for s in listed["sensors"]}


def test_dg_dev_serves_the_ui_and_stops_without_leftovers(tmp_path):
    port = free_port()
    env = dg_env(tmp_path)
    log = (tmp_path / "dg-dev.log").open("w")
    process = subprocess.Popen(
        [DG, "dev", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        info = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                response = requests.get(f"http://127.0.0.1:{port}/server_info", timeout=2)
                if response.ok:
                    info = response.json()
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        assert info is not None, (tmp_path / "dg-dev.log").read_text()[-3000:]
        assert "dagster_webserver_version" in info
    finally:
        stop_process(process)
        log.close()
    assert _group_gone(process.pid, timeout=15), "a process of dg dev's group is still running"


def _group_gone(group: int, timeout: float) -> bool:
    """Whether every process of the group has exited (killed ones may take a moment to be
    reaped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False
