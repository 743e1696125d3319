"""`make run`'s launcher, without dg dev: what it starts and configures, the one-line
errors a wrong setting or an unreachable server gives, the run folder's lock, the old
embedded store's data, the env file for a second shell, and that stopping it leaves nothing
running."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import dagster as dg
import pytest
import requests
from fixtures.sandbox import TENANT_A, TEST_KEY_A

from certyo_dagster.settings import PipelineSettings
from certyo_dagster.source.mongo import close_all_clients, open_client
from certyo_dagster.wiring import build_definitions
from certyo_demo.launcher import (
    LOCK_FILE,
    LaunchError,
    RunLock,
    Stack,
    _port,
    check_mongo,
    describe,
    start_stack,
    write_env_file,
)
from certyo_demo.servers import free_port, stop_process

NOW = datetime(2026, 3, 1, 12, 30)
REPO = Path(__file__).resolve().parents[2]
INSTANCE_CONFIG = REPO / "dagster.yaml"


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


def _closed_port() -> int:
    """A loopback port nothing listens on."""
    return free_port()


def _demo_stack(run_dir: Path, **options) -> Stack:
    options.setdefault("environ", _base_env())
    return start_stack(
        run_dir,
        dagster_port=free_port(),
        sandbox_port=free_port(),
        mongo_port=free_port(),
        instance_config=INSTANCE_CONFIG,
        start_dagster=False,
        **options,
    )


def _launch(run_dir: Path, **env: str) -> subprocess.CompletedProcess:
    """`make run`'s command, as a user runs it, with `env` on top of a clean environment."""
    return subprocess.run(
        [sys.executable, "-m", "certyo_demo.launcher"],
        cwd=REPO,
        env={**_base_env(), "CERTYO_RUN_DIR": str(run_dir), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_unconfigured_launch_starts_secantus_sandbox_seed_and_churn_then_stops_them(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    stack = _demo_stack(run_dir, seed_count=200, churn_interval=0.2, now=NOW)
    pids = stack.pids()
    try:
        env = stack.env
        assert stack.mongo_server is not None
        assert stack.mongo_server.storage == run_dir / "secantus"
        assert env["MONGO_URI"] == stack.mongo_server.uri
        assert env["MONGO_URI"].startswith("mongodb://127.0.0.1:")
        assert env["CERTYO_BASE_URL"] == stack.sandbox_url
        assert env["CERTYO_API_KEY"] == "cty_sandbox_dev_key"
        assert env["CERTYO_TENANT_ID"] == "sandbox-tenant"
        assert env["CERTYO_DEMO_MODE"] == "1"
        assert env["CERTYO_PARTITION_START"] == "2026-03-01T08:00"
        assert env["DAGSTER_HOME"] == str(run_dir / "dagster_home")
        assert (run_dir / "dagster_home" / "dagster.yaml").read_text() == (
            INSTANCE_CONFIG.read_text()
        )
        assert stack.seeded == 200
        stats = requests.get(f"{stack.sandbox_url}/_sandbox/stats", timeout=5).json()
        assert stats["chain_rpc"].startswith("http://127.0.0.1:")  # anchors on a local chain
        assert set(stack.processes) == {"chain", "sandbox", "churn"}
        assert len(pids) == 4  # chain, sandbox, churn and SecantusDB
        close_all_clients()
        products = open_client(env["MONGO_URI"])["productdb"]["products"]
        assert products.count_documents({}) >= 200
        churn_log = run_dir / "logs" / "churn.log"
        deadline = time.monotonic() + 60
        while "churn tick 2" not in churn_log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert products.count_documents({"updatedAt": {"$gt": NOW}}) > 0  # churn's edits
        # Stop the churn (it also deletes products), then count what the next launch must keep.
        stop_process(stack.processes["churn"])
        held = products.count_documents({})

        # The banner says where to look and how to reach the stack from a second shell.
        banner = describe(stack)
        assert f"SecantusDB {env['MONGO_URI']}" in banner
        assert "productdb/products/anchoring_status" in banner
        assert f"{stack.sandbox_url}/_sandbox/stats" in banner
        assert f"source {stack.env_file}" in banner
        assert "STOPPED" not in banner  # demo mode: sensors and schedules run
    finally:
        stack.stop()
        close_all_clients()
    assert not [pid for pid in pids if _alive(pid)]
    assert not stack.env_file.exists()  # the stack's ports are gone with it

    # A second launch keeps the data: no second seeding, same partition start.
    again = _demo_stack(run_dir, seed_count=200)
    try:
        close_all_clients()
        kept = open_client(again.env["MONGO_URI"])["productdb"]["products"].count_documents({})
    finally:
        again.stop()
        close_all_clients()
    assert again.seeded == 0 and kept == held
    assert again.env["CERTYO_PARTITION_START"] == "2026-03-01T08:00"


def test_change_stream_capture_demo_ships_the_catalog_from_the_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`CERTYO_CAPTURE=change_stream make run`: the same stack, captured by stream_products:
    the seeded catalog by its snapshot, then each change from the stream."""
    environ = {**_base_env(), "CERTYO_CAPTURE": "change_stream"}
    stack = _demo_stack(tmp_path / "run", environ=environ, seed_count=60, churn=False)
    try:
        assert "Capture         change_stream" in describe(stack)
        for name, value in stack.env.items():
            monkeypatch.setenv(name, value)
        defs = build_definitions(PipelineSettings.from_env(stack.env))
        assert not [j for j in defs.resolve_all_job_defs() if j.name.startswith("ingest_")]
        job = defs.resolve_job_def("stream_products")
        instance = dg.DagsterInstance.ephemeral()

        def stored() -> int:
            stats = requests.get(f"{stack.sandbox_url}/_sandbox/stats", timeout=5).json()
            return stats["records_stored"]

        assert job.execute_in_process(instance=instance).success
        assert stored() == 60  # the snapshot: one upsert per seeded product
        close_all_clients()
        products = open_client(stack.env["MONGO_URI"])["productdb"]["products"]
        assert products.count_documents({"certyo_status": "pending"}) == 60
        products.insert_one({"_id": "demo-new", "sku": "NEW-1", "updatedAt": NOW})
        assert job.execute_in_process(instance=instance).success
        assert stored() == 61  # the insert, from the stream
        assert products.find_one({"_id": "demo-new"})["certyo_status"] == "pending"
    finally:
        stack.stop()
        close_all_clients()


def test_env_file_gives_a_second_shell_the_stack_environment(tmp_path: Path) -> None:
    stack = _demo_stack(tmp_path / "run", seed_count=20, churn=False)
    try:
        shown = subprocess.run(
            [
                "bash",
                "-c",
                f"source {stack.env_file} && env",
            ],
            env={"PATH": os.environ["PATH"]},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        exported = dict(line.split("=", 1) for line in shown if "=" in line)
        for name in (
            "MONGO_URI",
            "CERTYO_BASE_URL",
            "CERTYO_API_KEY",
            "CERTYO_TENANT_ID",
            "CERTYO_PARTITION_START",
            "CERTYO_DEMO_MODE",
            "DAGSTER_HOME",
        ):
            assert exported[name] == stack.env[name], name
        assert oct(stack.env_file.stat().st_mode & 0o777) == "0o600"
    finally:
        stack.stop()


def test_env_file_never_holds_a_secret(tmp_path: Path) -> None:
    """Outside the demo the API key and a password in MONGO_URI are left to the user."""
    stack = Stack(
        run_dir=tmp_path,
        env={
            "MONGO_URI": "mongodb://app:PASSWORD-in-uri@127.0.0.1:27017/",
            "CERTYO_BASE_URL": "https://api.certyo.example",
            "CERTYO_API_KEY": "cty_live_abc",
            "CERTYO_TENANT_ID": "acme",
            "CERTYO_KAFKA_PASSWORD": "kafka-pw",
            "CERTYO_COLLECTIONS": "products,orders:modifiedAt",
            "DAGSTER_HOME": str(tmp_path / "home"),
            "PATH": "/usr/bin",
        },
        dagster_url="http://127.0.0.1:3000",
        sandbox_url=None,
    )
    text = write_env_file(stack).read_text()
    for secret in ("PASSWORD-in-uri", "cty_live_abc", "kafka-pw"):
        assert secret not in text
    assert "# MONGO_URI holds a password; export it yourself: mongodb://app:***@" in text
    assert "# CERTYO_API_KEY is a secret; export it yourself" in text
    assert "export CERTYO_COLLECTIONS=products,orders:modifiedAt" in text
    assert "export CERTYO_TENANT_ID=acme" in text
    assert "PATH" not in text


def test_configured_launch_checks_both_servers_and_starts_neither_sandbox_nor_demo(
    tmp_path: Path, secantus, sandbox
) -> None:
    environ = {
        **_base_env(),
        "MONGO_URI": secantus.uri,
        "MONGO_DATABASE": "certyo_launcher_configured",
        "CERTYO_BASE_URL": sandbox.base_url,
        "CERTYO_API_KEY": TEST_KEY_A,
        "CERTYO_TENANT_ID": TENANT_A,
    }
    stack = _demo_stack(tmp_path / "run", environ=environ)
    try:
        banner = describe(stack)
        env_text = stack.env_file.read_text()
    finally:
        stack.stop()
    assert stack.processes == {} and stack.seeded == 0 and stack.sandbox_url is None
    assert stack.mongo_server is None
    assert stack.env["MONGO_URI"] == secantus.uri
    assert stack.env["CERTYO_API_KEY"] == TEST_KEY_A
    assert "CERTYO_DEMO_MODE" not in stack.env
    # Outside the demo the sensors and schedules start stopped, and the banner says how to
    # turn them on; the env file leaves the key out.
    assert "sensors and schedules start STOPPED" in banner
    assert "dagster sensor start --start-all" in banner
    assert "certyo_launcher_configured/products/anchoring_status" in banner
    assert TEST_KEY_A not in env_text


def test_unreachable_mongodb_is_one_line_with_the_uri_redacted(tmp_path: Path, sandbox) -> None:
    uri = f"mongodb://app:PASSWORD-secret@127.0.0.1:{_closed_port()}/?directConnection=true"
    environ = {
        **_base_env(),
        "MONGO_URI": uri,
        "CERTYO_BASE_URL": sandbox.base_url,
        "CERTYO_API_KEY": TEST_KEY_A,
        "CERTYO_TENANT_ID": TENANT_A,
    }
    with pytest.raises(LaunchError) as caught:
        _demo_stack(tmp_path / "run", environ=environ)
    message = str(caught.value)
    shown = uri.replace("PASSWORD-secret", "***")
    assert message == f"MongoDB at {shown} cannot be reached: [Errno 111] Connection refused"
    assert "PASSWORD-secret" not in message
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released


def test_a_malformed_mongo_uri_is_one_line_without_its_password() -> None:
    with pytest.raises(LaunchError) as caught:
        check_mongo("mongodb://app:PASSWORD-secret@127.0.0.1:notaport/")
    assert str(caught.value).startswith(
        "MONGO_URI mongodb://app:***@127.0.0.1:notaport/ is not a usable MongoDB URI: "
        "Port contains non-digit characters"
    )
    assert "PASSWORD-secret" not in str(caught.value)


def test_unreachable_certyo_and_a_refused_key_are_one_line(tmp_path: Path, secantus, sandbox):
    base = {
        **_base_env(),
        "MONGO_URI": secantus.uri,
        "CERTYO_TENANT_ID": TENANT_A,
        "CERTYO_API_KEY": TEST_KEY_A,
    }
    closed = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(LaunchError) as caught:
        _demo_stack(tmp_path / "a", environ={**base, "CERTYO_BASE_URL": closed})
    assert str(caught.value) == (
        f"Certyo at {closed} cannot be reached: [Errno 111] Connection refused"
    )

    wrong_key = {**base, "CERTYO_BASE_URL": sandbox.base_url, "CERTYO_API_KEY": "cty_wrong"}
    with pytest.raises(LaunchError) as caught:
        _demo_stack(tmp_path / "b", environ=wrong_key)
    assert str(caught.value).startswith(f"Certyo at {sandbox.base_url} refused CERTYO_API_KEY")
    assert "cty_wrong" not in str(caught.value)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            {"CERTYO_BASE_URL": "https://api.certyo.example"},
            "CERTYO_BASE_URL is set but CERTYO_API_KEY and CERTYO_TENANT_ID not: set both",
        ),
        (
            {"CERTYO_COLLECTIONS": "products,bad name"},
            "collection name 'bad name' must start with a letter",
        ),
        (
            {"CERTYO_PARTITION_START": "yesterday"},
            "CERTYO_PARTITION_START='yesterday' is not an ISO 8601 time",
        ),
        (
            {"CERTYO_VERIFY_CRON": "every minute"},
            "Found invalid cron schedule 'every minute' for schedule 'verify_products_schedule'",
        ),
        (
            # The sandbox's fake anchoring must never write `anchored` into a real collection.
            {"MONGO_URI": "mongodb://127.0.0.1:1/"},
            "MONGO_URI is set but CERTYO_BASE_URL is not",
        ),
        (
            {
                "CERTYO_BASE_URL": "http://certyo.example",
                "CERTYO_API_KEY": "cty_live_abc",
                "CERTYO_TENANT_ID": "acme",
            },
            "uses plain http to a non-loopback host",
        ),
    ],
    ids=[
        "key-missing",
        "bad-collections",
        "bad-partition-start",
        "bad-cron",
        "mongo-only",
        "plain-http",
    ],
)
def test_a_wrong_setting_is_one_line_and_never_a_traceback(
    tmp_path: Path, settings: dict[str, str], expected: str
) -> None:
    done = _launch(tmp_path / "run", **settings)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("certyo_dagster: ") and expected in lines[0]
    assert "cty_live_abc" not in done.stderr
    assert not (tmp_path / "run").exists()  # refused before anything started


def test_a_second_run_in_the_same_folder_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    stack = _demo_stack(run_dir, seed_count=20, churn=False)
    try:
        done = _launch(run_dir)
        with pytest.raises(LaunchError, match="another `make run`"):
            _demo_stack(run_dir)
    finally:
        stack.stop()
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        f"certyo_dagster: another `make run` (pid {os.getpid()}) is using {run_dir}: stop it "
        "first (Ctrl-C in its terminal), or set CERTYO_RUN_DIR to another folder"
    )
    # Once the first has stopped, the folder is free again.
    _demo_stack(run_dir, seed_count=20, churn=False).stop()


def test_a_crashed_run_does_not_leave_the_folder_locked(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from certyo_demo.launcher import "
            "RunLock; held = RunLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); "
            "time.sleep(120)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LaunchError, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    finally:
        holder.kill()
        holder.wait(10)
    assert (tmp_path / LOCK_FILE).exists()  # the killed run left its file behind
    RunLock(tmp_path).acquire().release()  # and it does not count


def test_old_embedded_store_data_is_detected_explained_and_reseeded(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    old = run_dir / "mongo" / "productdb"
    old.mkdir(parents=True)
    (old / "products.collection").write_bytes(b"SQLite format 3\x00")
    (run_dir / "demo.json").write_text('{"partition_start": "2025-01-01T00:00"}')
    (run_dir / "dagster_home").mkdir()
    (run_dir / "dagster_home" / "history.db").write_bytes(b"old runs")
    told: list[str] = []
    stack = _demo_stack(run_dir, seed_count=50, churn=False, now=NOW, report=told.append)
    stack.stop()
    assert len(told) == 1
    assert told[0].startswith(f"{run_dir / 'mongo'} holds demo data of the old embedded store")
    assert "starts over with a fresh catalog" in told[0]
    assert not (run_dir / "mongo").exists()
    assert not (run_dir / "dagster_home" / "history.db").exists()
    assert stack.seeded == 50
    assert stack.env["CERTYO_PARTITION_START"] == "2026-03-01T08:00"  # chosen afresh


def test_a_taken_port_is_named_not_silently_moved() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        notes: list[str] = []
        chosen = _port(port, "the Dagster UI", notes)
    assert chosen != port
    assert notes == [f"port {port} is in use, so the Dagster UI is on port {chosen}"]


def test_a_server_that_exits_while_starting_is_shown_with_the_end_of_its_log(
    tmp_path: Path,
) -> None:
    """A sandbox port someone else listens on: the error says why the sandbox exited, and
    the run folder is released for the next try."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(LaunchError) as caught:
            start_stack(
                tmp_path / "run",
                dagster_port=free_port(),
                sandbox_port=port,
                mongo_port=free_port(),
                environ=_base_env(),
                instance_config=INSTANCE_CONFIG,
                start_dagster=False,
            )
    message = str(caught.value)
    assert message.startswith("certyo-sandbox exited with 1; the end of ")
    assert "Address already in use" in message
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_picked_ports_are_ones_no_outgoing_connection_can_take() -> None:
    """Outgoing connections get their local port from the OS's ephemeral range, and one that
    took a port picked for a server would stop that server from binding it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    picked = [free_port() for _ in range(200)]
    assert all(1024 <= port < low for port in picked)
    assert len(set(picked)) == len(picked)  # none handed out twice before it is bound


def test_a_run_stops_what_a_killed_run_left_running_in_its_folder(tmp_path: Path) -> None:
    """The launcher SIGKILLed: its SecantusDB, sandbox and churn live on, holding the storage
    and ports. The next run in the folder stops them and starts cleanly."""
    run_dir = tmp_path / "run"
    script = (
        "import sys, time; from pathlib import Path; from certyo_demo.launcher import "
        "start_stack; from certyo_demo.servers import free_port; "
        "stack = start_stack(Path(sys.argv[1]), dagster_port=free_port(), "
        "sandbox_port=free_port(), mongo_port=free_port(), environ={'PATH': sys.argv[2]}, "
        "seed_count=20, churn_interval=0.5, start_dagster=False); "
        "print(' '.join(map(str, stack.pids())), flush=True); time.sleep(120)"
    )
    crashed = subprocess.Popen(
        [sys.executable, "-c", script, str(run_dir), os.environ["PATH"]],
        stdout=subprocess.PIPE,
        text=True,
    )
    left: list[int] = []
    try:
        left = [int(pid) for pid in crashed.stdout.readline().split()]
        crashed.send_signal(signal.SIGKILL)
        crashed.wait(10)
        # The local chain, the sandbox, churn and SecantusDB.
        assert len(left) == 4 and all(_alive(pid) for pid in left)
        told: list[str] = []
        stack = _demo_stack(run_dir, seed_count=20, churn=False, report=told.append)
        stack.stop()
    finally:
        crashed.kill()
        crashed.wait(10)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not [pid for pid in left if _alive(pid)]
    assert len(told) == 1 and told[0].startswith(f"stopped what an earlier run in {run_dir}")
    for pid in left:
        assert str(pid) in told[0]
