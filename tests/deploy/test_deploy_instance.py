"""The production instance (deploy/dagster.yaml) under load and under failure.

One deployment for the module: a PostgreSQL cluster, `dagster-webserver` and `dagster-daemon`
as subprocesses with the certyo_dagster code location watching three collections, SecantusDB
and a sandbox process. Each scenario writes its own document versions through a loss ledger
per collection; the ledgers accumulate, and each scenario ends with every ledger clean
(0 lost, 0 duplicates, every proof verified).

Versions written into past hours sit behind the change sensors' cursors (placed at the time
the deployment starts, as when a running pipeline meets older data), so only a backfill ships
them; the churn writes into the current hour, which the sensors ship.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import pytest
from bson import ObjectId
from fixtures.deploy import (
    COLLECTION_TAG,
    FINISHED,
    DagsterDeployment,
    Watcher,
    clean_environ,
    deploy_limits,
    wait_until,
)
from fixtures.ledger import LossLedger

from certyo_dagster.capture.cursors import write_cursor_mirror
from certyo_dagster.capture.polling import HOUR_FORMAT, VersionKey
from certyo_dagster.settings import CollectionSpec
from certyo_dagster.ship.resource import CertyoResource
from certyo_dagster.source.mongo import close_all_clients, open_client
from certyo_dagster.wiring.ingestion import asset_keys
from certyo_sandbox.server import SandboxConfig, SandboxProcess

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(900)]

COLLECTIONS = ["alpha", "beta", "gamma"]
API_KEY = "cty_deploy_test_key"
TENANT = "deploy-tenant"
HOURS = 24
RECORDS = "/api/v1/records"
BULK = "/api/v1/records/bulk"
# Every Certyo call is held a while, so calls of different steps overlap at the sandbox
# whenever the steps run at once.
SLOW_CERTYO = [
    {"path": BULK, "action": "delay", "seconds": 1.5, "times": 1_000_000},
    {"path": RECORDS, "action": "delay", "seconds": 0.4, "times": 1_000_000},
]
DONE = {"COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED", "COMPLETED"}


class Stack:
    """The module's deployment and everything a scenario needs to drive and check it."""

    def __init__(self, folder: Path, postgres, secantus) -> None:
        self.folder = folder
        self.postgres = postgres
        self.database_name = f"certyo_deploy_{uuid.uuid4().hex[:8]}"
        self.now = datetime.now(timezone.utc)
        current_hour = self.now.replace(minute=0, second=0, microsecond=0)
        self.first_hour = current_hour - timedelta(hours=HOURS)
        self.hours = [self.first_hour + timedelta(hours=h) for h in range(HOURS)]
        self.partitions = [h.strftime(HOUR_FORMAT) for h in self.hours]
        self.sandbox = SandboxProcess(
            SandboxConfig(
                api_keys={API_KEY: TENANT},
                enable_fault_injection=True,
                flush_records=100_000,
                flush_seconds=3600.0,
            )
        ).start()
        self.secantus = secantus
        self.db = open_client(secantus.uri)[self.database_name]
        self.specs = {c: CollectionSpec(self.database_name, c) for c in COLLECTIONS}
        client = CertyoResource(
            base_url=self.sandbox.base_url, api_key=API_KEY, tenant_id=TENANT
        ).get_client()
        self.ledgers = {
            c: LossLedger(self.db, spec, client, self.sandbox) for c, spec in self.specs.items()
        }
        env = {
            **clean_environ(),
            **postgres.env,
            "MONGO_URI": secantus.uri,
            "MONGO_DATABASE": self.database_name,
            "CERTYO_COLLECTIONS": ",".join(COLLECTIONS),
            "CERTYO_PARTITION_START": self.first_hour.strftime("%Y-%m-%dT%H:%M"),
            "CERTYO_SENSOR_INTERVAL_SECONDS": "5",
            # The scenarios wait for the hour in progress; do not pace its runs.
            "CERTYO_OPEN_HOUR_INTERVAL_MINUTES": "0",
            "CERTYO_BASE_URL": self.sandbox.base_url,
            "CERTYO_API_KEY": API_KEY,
            "CERTYO_TENANT_ID": TENANT,
        }
        self.dagster = DagsterDeployment(folder, env)

    def start(self) -> Stack:
        # The sensors begin at the deployment's start; older versions are a backfill's job.
        for spec in self.specs.values():
            write_cursor_mirror(self.db, spec, VersionKey(self.now.replace(tzinfo=None), None))
        self.dagster.start_daemon()
        self.dagster.start_webserver()
        for collection in COLLECTIONS:
            self.dagster.start_sensor(f"{collection}_change_sensor")
        return self

    def stop(self) -> None:
        try:
            self.dagster.stop()
        finally:
            self.sandbox.stop()
            with contextlib.suppress(Exception):
                self.db.client.drop_database(self.database_name)
            close_all_clients()

    # -- writing ---------------------------------------------------------------------------

    def write_past_hours(self, per_hour: int, minute: int) -> int:
        """`per_hour` new documents in each of the 24 past hours of every collection."""
        written = 0
        for collection, ledger in self.ledgers.items():
            for hour in self.hours:
                for n in range(per_hour):
                    ts = hour + timedelta(minutes=minute + n, seconds=len(collection))
                    ledger.write(_document(ObjectId(), ts, collection))
                    written += 1
        return written

    @contextlib.contextmanager
    def churn(self, every: float = 1.0) -> Iterator[list[int]]:
        """Application writes into the current hour while the block runs: new documents and
        new versions of them, one collection after the other."""
        stop = threading.Event()
        writes = [0]
        errors: list[BaseException] = []

        def loop() -> None:
            live: dict[str, list[ObjectId]] = {c: [] for c in COLLECTIONS}
            n = 0
            while not stop.wait(every):
                collection = COLLECTIONS[n % len(COLLECTIONS)]
                n += 1
                ts = datetime.now(timezone.utc).replace(tzinfo=None)
                ts = ts.replace(microsecond=ts.microsecond // 1000 * 1000)
                ids = live[collection]
                doc_id = ids[n % len(ids)] if len(ids) >= 3 and n % 2 else ObjectId()
                try:
                    self.ledgers[collection].write(_document(doc_id, ts, collection))
                except BaseException as exc:  # reported by the main thread
                    errors.append(exc)
                    return
                if doc_id not in ids:
                    ids.append(doc_id)
                writes[0] += 1

        thread = threading.Thread(target=loop, name="churn", daemon=True)
        thread.start()
        try:
            yield writes
        finally:
            stop.set()
            thread.join(30)
        assert not errors, errors

    # -- driving ---------------------------------------------------------------------------

    def launch_backfills(self, collections: list[str] = COLLECTIONS) -> dict[str, str]:
        """One backfill of the 24 past hours per collection, from the assets' page; the
        collection tag puts its run under the per-collection limit like every other run.

        Batches of 11 versions, one Certyo call at a time: a backfill step is a string of
        Certyo calls, so the calls of steps running at once overlap at the sandbox.
        """
        return {
            c: self.dagster.launch_backfill(
                [list(k.path) for k in _ingestion_keys(self.specs[c])],
                self.partitions,
                {COLLECTION_TAG: c},
                run_config={
                    "ops": {
                        f"ingest_{c}_window": {"config": {"batch_size": 11, "max_in_flight": 1}}
                    }
                },
            )
            for c in collections
        }

    def wait_for_backfills(self, backfills: dict[str, str], timeout: float) -> dict[str, str]:
        def statuses() -> dict[str, str] | None:
            found = {c: self.dagster.backfill_status(b) for c, b in backfills.items()}
            return found if all(s in DONE for s in found.values()) else None

        return wait_until(statuses, timeout, f"backfills {backfills}", every=2)

    def assert_backfills_succeeded(self, statuses: dict[str, str], backfills: dict[str, str]):
        failed = [c for c, status in statuses.items() if status != "COMPLETED_SUCCESS"]
        assert not failed, "\n".join(
            [*(self.dagster.explain_backfill(backfills[c]) for c in failed), "daemon log:"]
        ) + self.dagster.log_tail("daemon", 2000)

    def backfill_runs(self, backfill_id: str) -> list[dg.DagsterRun]:
        return self.dagster.runs(tags={"dagster/backfill": backfill_id})

    def caught_up(self) -> bool:
        """Every current version of every collection is acknowledged by Certyo."""
        for ledger in self.ledgers.values():
            acknowledged = ledger._acknowledged_keys()
            if any(v.key not in acknowledged for v in ledger._current.values()):
                return False
        return True

    def wait_idle(self, timeout: float) -> None:
        """No run queued or in progress, and everything shipped."""

        def idle() -> bool:
            active = self.dagster.runs(
                statuses=[
                    dg.DagsterRunStatus.QUEUED,
                    dg.DagsterRunStatus.NOT_STARTED,
                    dg.DagsterRunStatus.STARTING,
                    dg.DagsterRunStatus.STARTED,
                ]
            )
            return not active and self.caught_up()

        wait_until(idle, timeout, "every version to be shipped and the runs to end", every=3)

    def assert_ledgers_clean(self, scenario: str) -> int:
        self.sandbox.clear_faults()
        replays = 0
        for collection, ledger in self.ledgers.items():
            counts = ledger.check()
            counts.assert_clean(f"{scenario} {collection}")
            # A collection the scenarios have written to has records in Certyo.
            assert counts.accepted > 0 or not counts.versions, counts.line(scenario)
            replays += counts.replays
        return replays


def _ingestion_keys(spec: CollectionSpec) -> list[dg.AssetKey]:
    keys = asset_keys(spec)
    return [keys["changed_documents"], keys["certyo_records"], keys["ingestion_receipts"]]


def _document(doc_id: ObjectId, ts: datetime, collection: str) -> dict:
    return {
        "_id": doc_id,
        "sku": f"{collection}-{str(doc_id)[-6:]}",
        "price": f"{ts.minute}.{ts.second:02d}",
        "updatedAt": ts.replace(tzinfo=None),
    }


@pytest.fixture(scope="module")
def stack(postgres, secantus) -> Iterator[Stack]:
    folder = Path(tempfile.mkdtemp(prefix="certyo-deploy-"))
    built = None
    try:
        built = Stack(folder, postgres, secantus)
        yield built.start()
    finally:
        if built is not None:
            built.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_three_backfills_sensors_and_churn_hold_the_queue_the_tag_limit_and_the_pool(stack):
    limits = deploy_limits()
    stack.write_past_hours(per_hour=4, minute=5)
    stack.sandbox.script_faults(SLOW_CERTYO)
    with Watcher(stack.dagster) as watcher:
        backfills = stack.launch_backfills()
        with stack.churn(every=1.0) as writes:
            time.sleep(60)
        statuses = stack.wait_for_backfills(backfills, timeout=480)
    stack.assert_backfills_succeeded(statuses, backfills)
    stack.sandbox.clear_faults()
    stack.wait_idle(timeout=240)
    assert writes[0] > 20

    sensor_runs = stack.dagster.runs(tags={"certyo/trigger": "sensor"})
    assert sensor_runs, "the sensors shipped the churn"
    for run in [*sensor_runs, *[r for b in backfills.values() for r in stack.backfill_runs(b)]]:
        assert run.tags.get(COLLECTION_TAG) in COLLECTIONS, run.tags
    most = stack.sandbox.stats()["max_concurrent_requests_per_key"]
    print(
        f"deploy limits {limits}; sampled {watcher.samples}x: runs in progress "
        f"<= {watcher.max_runs}, per collection <= {watcher.max_runs_per_collection}, "
        f"certyo slots <= {watcher.max_slots}; sandbox concurrent requests per key {most}; "
        f"{len(sensor_runs)} sensor runs, {writes[0]} churn writes"
    )
    assert watcher.samples > 50
    assert 1 <= watcher.max_runs <= limits["max_concurrent_runs"]
    assert watcher.max_runs_per_collection <= limits["per_collection"]
    assert watcher.max_slots <= limits["pool"]
    assert 1 <= most[TENANT] <= limits["pool"]
    stack.assert_ledgers_clean("backfills+sensors+churn")


def test_a_daemon_killed_mid_backfill_and_restarted_completes_it_shipping_each_hour_once(stack):
    stack.write_past_hours(per_hour=2, minute=40)
    stack.sandbox.script_faults(SLOW_CERTYO)
    replays_before = stack.sandbox.stats()["idempotent_replays"]
    backfills = stack.launch_backfills()
    wait_until(
        lambda: any(stack.backfill_runs(b) for b in backfills.values()),
        120,
        "the first backfill run",
        every=0.5,
    )
    stack.dagster.kill_daemon()
    time.sleep(3)
    stack.dagster.start_daemon()
    statuses = stack.wait_for_backfills(backfills, timeout=480)
    stack.assert_backfills_succeeded(statuses, backfills)
    stack.sandbox.clear_faults()
    stack.wait_idle(timeout=240)
    for backfill in backfills.values():
        runs = stack.backfill_runs(backfill)
        # Single-run backfills: the 24 hours in one run, submitted once despite the restart.
        assert [r.status for r in runs] == [dg.DagsterRunStatus.SUCCESS], runs
    assert stack.sandbox.stats()["idempotent_replays"] == replays_before, "an hour shipped twice"
    stack.assert_ledgers_clean("daemon killed mid-backfill")


def test_a_killed_run_worker_fails_its_run_and_the_retry_and_the_sensor_ship_the_rest(stack):
    stack.sandbox.script_faults(
        [{"path": RECORDS, "action": "delay", "seconds": 2.0, "times": 1_000_000}]
    )
    ledger = stack.ledgers["alpha"]
    started = datetime.now(timezone.utc).replace(microsecond=0, tzinfo=None)
    written = [
        ledger.write(_document(ObjectId(), started + timedelta(milliseconds=n + 1), "alpha")).key
        for n in range(8)
    ]

    def shipped() -> int:
        acknowledged = ledger._acknowledged_keys()
        return sum(key in acknowledged for key in written)

    def worker_of_alpha():
        runs = stack.dagster.runs(
            statuses=[dg.DagsterRunStatus.STARTED], tags={COLLECTION_TAG: "alpha"}
        )
        workers = stack.dagster.run_workers()
        return (runs[0], workers) if runs and len(workers) == 1 else None

    run, (worker,) = wait_until(worker_of_alpha, 180, "a run of alpha in progress", every=0.5)
    # One record per call, each held 2 s: kill the worker once Certyo holds the first.
    wait_until(shipped, 120, "the run's first record at Certyo", every=0.2)
    os.kill(worker, signal.SIGKILL)
    at_kill = shipped()
    print(f"killed the run worker with {at_kill} of {len(written)} records at Certyo")
    assert 0 < at_kill < len(written), "the worker was killed in the middle of its run"
    failed = wait_until(
        lambda: (r := stack.dagster.instance.get_run_by_id(run.run_id)).status in FINISHED and r,
        120,
        "the run of the killed worker to end",
    )
    assert failed.status == dg.DagsterRunStatus.FAILURE
    retry = wait_until(
        lambda: stack.dagster.runs(tags={"dagster/parent_run_id": run.run_id}),
        120,
        "the retry run",
    )[0]
    wait_until(
        lambda: stack.dagster.instance.get_run_by_id(retry.run_id).status in FINISHED,
        240,
        "the retry to end",
    )
    assert stack.dagster.instance.get_run_by_id(retry.run_id).status == dg.DagsterRunStatus.SUCCESS
    # The sensor goes on: later changes are shipped by later runs.
    later = datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0)
    for n in range(3):
        ledger.write(_document(ObjectId(), later + timedelta(milliseconds=n + 1), "alpha"))
    stack.sandbox.clear_faults()
    stack.wait_idle(timeout=240)
    # The dead run's `certyo` slot comes back (free_slots_after_run_end_seconds), so the
    # pool is not one slot short from now on.
    pool = stack.dagster.instance.event_log_storage
    wait_until(
        lambda: pool.get_concurrency_info("certyo").active_slot_count == 0,
        240,
        "the killed run's pool slot to be freed",
        every=5,
    )
    stack.assert_ledgers_clean("run worker killed")


def test_postgresql_restarted_while_runs_are_in_flight_loses_nothing(stack):
    stack.write_past_hours(per_hour=2, minute=50)
    stack.sandbox.script_faults(SLOW_CERTYO)
    backfills = stack.launch_backfills()
    wait_until(
        lambda: stack.dagster.runs(statuses=[dg.DagsterRunStatus.STARTED]),
        180,
        "a backfill run in progress",
        every=0.5,
    )
    stack.postgres.restart(down_seconds=5)
    statuses = stack.wait_for_backfills(backfills, timeout=480)
    print(f"backfills after the PostgreSQL restart: {statuses}")
    # A backfill whose run failed for good is launched again, as an operator would.
    again = {c: b for c, b in statuses.items() if b != "COMPLETED_SUCCESS"}
    if again:
        retried = stack.launch_backfills(sorted(again))
        assert set(stack.wait_for_backfills(retried, timeout=480).values()) == {"COMPLETED_SUCCESS"}
    stack.sandbox.clear_faults()
    stack.wait_idle(timeout=240)
    wait_until(stack.dagster.daemons_healthy, 120, "the daemons to report healthy")
    stack.assert_ledgers_clean("PostgreSQL restarted")


def test_stopping_the_deployment_leaves_no_process_behind(stack):
    assert stack.dagster.leftover_processes()
    stack.dagster.stop()
    wait_until(lambda: not stack.dagster.leftover_processes(), 30, "the processes to exit")
