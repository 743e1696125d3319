"""`make demo`: the whole pipeline once, from the command line, with a pass/fail summary.

Starts SecantusDB and certyo-sandbox in a fresh run folder, seeds the catalog, materializes
the seeded hourly partitions with `dagster job execute`, waits for the sandbox to anchor every
batch, runs the verify job until no document is pending, and prints documents per
certyo_status beside the sandbox's counts. It exits non-zero when anything is missing, so CI
can run it too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import requests
from tabulate import tabulate

from certyo_dagster.capture.polling import HOUR_FORMAT
from certyo_dagster.settings import DEFAULT_DATABASE
from certyo_dagster.source.mongo import close_all_clients, open_client
from certyo_demo.launcher import RUN_DIR_NAME, Stack, start_stack
from certyo_demo.servers import free_port

COLLECTION = "products"
VERIFY_ROUNDS = 6


@dataclass
class DemoOutcome:
    by_status: dict[str, int]
    total: int
    records_stored: int
    batches_anchored: int
    pending_in_sandbox: int
    partitions: list[str]
    failed_runs: list[str]

    def problems(self) -> list[str]:
        """What a person would call broken, in words; empty when the demo worked."""
        found = [f"dagster run failed: {run}" for run in self.failed_runs]
        anchored = self.by_status.get("anchored", 0)
        if anchored != self.total:
            found.append(f"{self.total - anchored} of {self.total} documents are not anchored")
        if self.records_stored < self.total:
            found.append(f"the sandbox stored {self.records_stored} records for {self.total} docs")
        if self.batches_anchored == 0:
            found.append("the sandbox anchored no batch")
        if self.pending_in_sandbox:
            found.append(f"{self.pending_in_sandbox} records still wait for a batch")
        return found


def demo_partitions(now: datetime, hours: int) -> list[str]:
    """The `hours` most recent hourly partition keys up to and including the current hour."""
    current = now.replace(minute=0, second=0, microsecond=0)
    return [(current - timedelta(hours=h)).strftime(HOUR_FORMAT) for h in range(hours, -1, -1)]


def _dagster(stack: Stack, args: list[str], log_name: str) -> bool:
    command = [
        sys.executable,
        "-m",
        "dagster",
        "job",
        "execute",
        "-m",
        "certyo_dagster.definitions",
    ]
    with open(stack.log_dir / f"{log_name}.log", "ab") as log:
        done = subprocess.run(
            command + args,
            cwd=stack.run_dir,
            env=stack.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        )
    return done.returncode == 0


def _sandbox_stats(stack: Stack) -> dict[str, Any]:
    return requests.get(f"{stack.sandbox_url}/_sandbox/stats", timeout=10).json()


def _wait_for_anchoring(stack: Stack, deadline: float) -> dict[str, Any]:
    stats = _sandbox_stats(stack)
    while stats["pending_records"] and time.monotonic() < deadline:
        time.sleep(1)
        stats = _sandbox_stats(stack)
    return stats


def _summary(stack: Stack) -> tuple[dict[str, int], int]:
    from certyo_dagster.verify.pending import anchoring_summary

    close_all_clients()
    try:
        products = open_client(stack.env["MONGO_URI"])[DEFAULT_DATABASE][COLLECTION]
        summary = anchoring_summary(products)
    finally:
        close_all_clients()
    return {k: v for k, v in summary.by_status.items() if v}, summary.total


def run_demo(
    hours: int = 3,
    timeout: float = 600,
    run_dir: str | Path | None = None,
    seed_count: int = 3000,
    instance_config: Path | None = None,
) -> int:
    """Run the demo; 0 when every document ended anchored and the sandbox agrees."""
    started = time.monotonic()
    deadline = started + timeout
    run_path = Path(run_dir) if run_dir else Path.cwd() / RUN_DIR_NAME / "make-demo"
    shutil.rmtree(run_path, ignore_errors=True)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    partitions = demo_partitions(now, hours)
    # Always its own SecantusDB and sandbox: the demo must not write to a configured one.
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith(("CERTYO_", "MONGO_", "DAGSTER_"))
    }
    first_hour = datetime.strptime(partitions[0], HOUR_FORMAT)
    environ["CERTYO_PARTITION_START"] = first_hour.strftime("%Y-%m-%dT%H:%M")
    print(f"make demo: data and logs in {run_path}", flush=True)
    stack = start_stack(
        run_path,
        dagster_port=free_port(),
        sandbox_port=free_port(),
        mongo_port=free_port(),
        environ=environ,
        instance_config=instance_config,
        seed_count=seed_count,
        start_dagster=False,
        churn=False,
        seed_hours=hours,
        now=now,
    )
    failed_runs: list[str] = []
    try:
        print(f"seeded {stack.seeded} products over the last {hours} hours", flush=True)
        for key in partitions:
            t0 = time.monotonic()
            tags = json.dumps({"dagster/partition": key})
            ok = _dagster(stack, ["-j", f"ingest_{COLLECTION}", "--tags", tags], "ingest")
            print(
                f"ingest_{COLLECTION} [{key}]: {'ok' if ok else 'FAILED'} "
                f"({time.monotonic() - t0:.0f} s)",
                flush=True,
            )
            if not ok:
                failed_runs.append(f"ingest_{COLLECTION} [{key}]")
        stats = _wait_for_anchoring(stack, deadline)
        print(
            f"sandbox: {stats['records_stored']} records, {stats['batches_anchored']} batches "
            "anchored",
            flush=True,
        )
        for round_number in range(1, VERIFY_ROUNDS + 1):
            t0 = time.monotonic()
            ok = _dagster(stack, ["-j", f"verify_{COLLECTION}"], "verify")
            by_status, total = _summary(stack)
            print(
                f"verify_{COLLECTION} round {round_number}: {'ok' if ok else 'FAILED'} "
                f"({time.monotonic() - t0:.0f} s), {by_status}",
                flush=True,
            )
            if not ok:
                failed_runs.append(f"verify_{COLLECTION} round {round_number}")
            if not by_status.get("pending") or time.monotonic() > deadline:
                break
            time.sleep(2)
        stats = _sandbox_stats(stack)
    finally:
        stack.stop()
    outcome = DemoOutcome(
        by_status=by_status,
        total=total,
        records_stored=stats["records_stored"],
        batches_anchored=stats["batches_anchored"],
        pending_in_sandbox=stats["pending_records"],
        partitions=partitions,
        failed_runs=failed_runs,
    )
    print()
    print(render_summary(outcome))
    print(f"\nmake demo took {time.monotonic() - started:.0f} s; logs in {stack.log_dir}")
    problems = outcome.problems()
    for problem in problems:
        print(f"MISSING: {problem}", file=sys.stderr)
    return 1 if problems else 0


def render_summary(outcome: DemoOutcome) -> str:
    rows = [[f"documents {status}", count] for status, count in sorted(outcome.by_status.items())]
    rows += [
        ["documents in total", outcome.total],
        ["records in the sandbox", outcome.records_stored],
        ["batches anchored", outcome.batches_anchored],
        ["records waiting for a batch", outcome.pending_in_sandbox],
        ["partitions materialized", f"{outcome.partitions[0]} .. {outcome.partitions[-1]}"],
    ]
    return tabulate(rows, headers=["", "count"], tablefmt="github")
