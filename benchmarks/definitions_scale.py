"""How the code location scales with the number of collections: load time, idle tick, memory.

For 10, 100 and 300 collections (CERTYO_COLLECTIONS=c0000,c0001,...):

- load: a real code server, `dagster api grpc --module-name certyo_dagster.definitions`, is
  started and timed until it has answered a ping (it has loaded the definitions) and handed
  over the repository snapshot, which the webserver and the daemon fetch first and which the
  server builds on demand. Its RSS then is the code server's memory. The same is measured for a
  code location of no collection's own (a module that only imports dagster and the product),
  the baseline every code server pays. Its CPU seconds until then are reported too: they
  are what the load costs on a core of its own, while the wall-clock seconds on a shared
  machine also count the waiting for a core.
- tick: in this process, the change sensor of every collection ticks twice against a
  SecantusDB (one database, N collections of 10 documents each, all older than the
  sensor's cursor and its lookback: idle). The second tick is timed: the steady state.

Targets: 100 collections load in under 10 s; an idle tick takes under 200 ms.

    .venv/bin/python benchmarks/definitions_scale.py --repeat 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import dagster as dg
from _common import machine, median, write_result
from bson import ObjectId
from dagster._core.remote_origin import GrpcServerCodeLocationOrigin, RemoteRepositoryOrigin
from dagster._grpc.client import DagsterGrpcClient

from certyo_dagster.capture.cursors import write_cursor_mirror
from certyo_dagster.capture.polling import VersionKey
from certyo_dagster.settings import PipelineSettings, parse_collections
from certyo_dagster.ship.resource import CertyoResource
from certyo_dagster.source.mongo import MongoResource, close_all_clients, open_client
from certyo_dagster.wiring import build_definitions
from certyo_demo.servers import SecantusServer, free_port, stop_process

SIZES = (10, 100, 300)
LOAD_TARGET_SECONDS = 10.0  # at 100 collections
TICK_TARGET_MS = 200.0
DATABASE = "scaledb"
DOCUMENTS_PER_COLLECTION = 10
# The baseline code location: dagster and the product imported, no collection's definitions.
BASELINE_MODULE = (
    "import dagster as dg\nimport certyo_dagster.wiring  # noqa: F401\ndefs = dg.Definitions()\n"
)


def collection_names(count: int) -> list[str]:
    return [f"c{i:04d}" for i in range(count)]


def rss_tree_mb(pid: int) -> float:
    """RSS of `pid` (a code server is one process)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` so far: what the load costs, whatever else the machine
    runs (wall-clock seconds on a shared machine also count the waiting for a core)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def code_server(
    env: dict[str, str], target: list[str], timeout: float = 300, cwd: Path | None = None
) -> dict[str, Any]:
    """Start `dagster api grpc`, time it until it serves, read its RSS, stop it."""
    port = free_port()
    dagster = str(Path(sys.executable).with_name("dagster"))
    client = DagsterGrpcClient(port=port, host="127.0.0.1")
    began = time.perf_counter()
    process = subprocess.Popen(
        [dagster, "api", "grpc", *target, "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = began + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"code server exited: {process.stderr.read().decode()[-2000:]}")
            if _serving(client):
                break
            if time.perf_counter() > deadline:
                raise RuntimeError("code server did not become healthy in time")
            time.sleep(0.1)
        serving = time.perf_counter() - began
        # What the webserver and the daemon ask for first: the repository snapshot (every
        # job, asset, sensor and schedule, serialized). The server builds it on demand.
        origin = RemoteRepositoryOrigin(
            GrpcServerCodeLocationOrigin(host="127.0.0.1", port=port, location_name="scale"),
            "__repository__",
        )
        snapshot = client.external_repository(origin, timeout=timeout)
        seconds = time.perf_counter() - began
        return {
            "load_seconds": round(seconds, 3),
            "load_cpu_seconds": round(cpu_seconds(process.pid), 2),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "serving_seconds": round(serving, 3),
            "snapshot_mb": round(len(snapshot) / 1e6, 2),
            "rss_mb": round(rss_tree_mb(process.pid), 1),
        }
    finally:
        stop_process(process, grace=10)


def _serving(client: DagsterGrpcClient) -> bool:
    try:
        client.ping("certyo")
        return True
    except Exception:  # not listening yet
        return False


def seed(uri: str, names: list[str]) -> None:
    """N idle collections: documents two hours old, cursors at now (nothing to do)."""
    database = open_client(uri)[DATABASE]
    old = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(hours=2)
    settings = settings_for(names)
    for spec in settings.collections:
        if database[spec.collection].estimated_document_count():
            continue
        database[spec.collection].insert_many(
            [
                {"_id": ObjectId(), "sku": f"{spec.collection}-{n}", "updatedAt": old}
                for n in range(DOCUMENTS_PER_COLLECTION)
            ]
        )
        write_cursor_mirror(
            database, spec, VersionKey(datetime.now(timezone.utc).replace(tzinfo=None), None)
        )


def settings_for(names: list[str]) -> PipelineSettings:
    return PipelineSettings(collections=parse_collections(",".join(names), DATABASE))


def ticks(uri: str, names: list[str], instance: dg.DagsterInstance) -> dict[str, Any]:
    """Each collection's change sensor, ticked twice; the second tick is timed."""
    settings = settings_for(names)
    mongo = MongoResource(uri=uri, database=DATABASE)
    resources = {
        "mongo": mongo,
        "certyo": CertyoResource(
            base_url="http://127.0.0.1:9", api_key="unused-key", tenant_id="t"
        ),
    }
    began = time.perf_counter()
    defs = build_definitions(settings, resources=resources)
    repository = defs.get_repository_def()
    build_seconds = time.perf_counter() - began
    timings = []
    skipped = 0
    for name in names:
        sensor = repository.get_sensor_def(f"{name}_change_sensor")
        cursor = None
        for _ in range(2):
            context = dg.build_sensor_context(
                cursor=cursor, instance=instance, resources={"mongo": mongo}
            )
            started = time.perf_counter()
            result = sensor.evaluate_tick(context)
            elapsed = time.perf_counter() - started
            cursor = result.cursor
        timings.append(elapsed * 1000)
        if not result.run_requests:
            skipped += 1
        else:
            raise RuntimeError(f"{name}: an idle collection requested runs: {result}")
    timings.sort()
    return {
        "in_process_build_seconds": round(build_seconds, 3),
        "tick_ms_median": round(median(timings), 2),
        "tick_ms_p95": round(timings[int(len(timings) * 0.95) - 1], 2),
        "tick_ms_max": round(timings[-1], 2),
        "idle_ticks": skipped,
    }


def measured_code(folder: Path | None = None) -> dict[str, str]:
    """Which checkout of the product was measured (the code server imports the same one)."""
    import certyo_dagster

    folder = folder or Path(certyo_dagster.__file__).resolve().parents[1]
    commit = subprocess.run(
        ["git", "-C", str(folder), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    return {"folder": str(folder), "commit": commit}


def compared_load(
    env: dict[str, str], target: list[str], checkout: Path, size: int, results: dict
) -> dict[str, Any]:
    """The same load from another checkout (alternating order with ours, round by round)."""
    run = code_server({**env, "PYTHONPATH": str(checkout)}, target, cwd=checkout)
    results["compared"].setdefault(str(size), []).append(run)
    print(f"{size:4d} collections, {checkout}: {run}", flush=True)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--repeat", type=int, default=3, help="runs; medians are reported")
    parser.add_argument(
        "--compare",
        type=Path,
        help="another checkout of the project: its code server is loaded in the same rounds "
        "(PYTHONPATH and working directory set to it) and the ratios are reported",
    )
    args = parser.parse_args()

    server = SecantusServer().start()
    folder = Path(tempfile.mkdtemp(prefix="certyo-scale-"))
    baseline_file = folder / "baseline_location.py"
    baseline_file.write_text(BASELINE_MODULE)
    base_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("CERTYO_", "MONGO_", "DAGSTER_"))
    }
    base_env.update(
        {
            "DAGSTER_HOME": str(folder),
            "MONGO_URI": server.uri,
            "MONGO_DATABASE": DATABASE,
            "CERTYO_API_KEY": "unused-key",
        }
    )
    (folder / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    results: dict[str, Any] = {"sizes": {}, "baseline": [], "compared": {}}
    try:
        with dg.instance_for_test() as instance:
            for size in args.sizes:
                seed(server.uri, collection_names(size))
            # Rounds interleave the baseline and every size, so a change in the machine's
            # load during the run affects them alike.
            for round_number in range(args.repeat):
                baseline = code_server(base_env, ["--python-file", str(baseline_file)])
                results["baseline"].append(baseline)
                print(f"   0 collections (baseline): {baseline}", flush=True)
                for size in args.sizes:
                    names = collection_names(size)
                    env = {**base_env, "CERTYO_COLLECTIONS": ",".join(names)}
                    target = ["--module-name", "certyo_dagster.definitions"]
                    if args.compare and round_number % 2:
                        compared_load(env, target, args.compare, size, results)
                    run = code_server(env, target)
                    if args.compare and not round_number % 2:
                        compared_load(env, target, args.compare, size, results)
                    run.update(ticks(server.uri, names, instance))
                    results["sizes"].setdefault(str(size), []).append(run)
                    print(f"{size:4d} collections: {run}", flush=True)
    finally:
        close_all_clients()
        server.stop()

    baseline_load = median([r["load_seconds"] for r in results["baseline"]])
    baseline_rss = median([r["rss_mb"] for r in results["baseline"]])
    baseline_cpu = median([r["load_cpu_seconds"] for r in results["baseline"]])
    print(
        f"\nbaseline code server (no collection): load {baseline_load:.2f} s "
        f"({baseline_cpu:.2f} s CPU), RSS {baseline_rss:.0f} MB"
    )
    print(
        "collections | load s | load - baseline | CPU s | build s (in process) | RSS MB "
        "| RSS - baseline | tick ms median/p95"
    )
    summary = {}
    for size, runs in results["sizes"].items():
        row = {
            key: median([r[key] for r in runs])
            for key in (
                "load_seconds",
                "load_cpu_seconds",
                "rss_mb",
                "in_process_build_seconds",
                "tick_ms_median",
                "tick_ms_p95",
            )
        }
        summary[size] = row
        print(
            f"{size:>11} | {row['load_seconds']:6.2f} | {row['load_seconds'] - baseline_load:15.2f}"
            f" | {row['load_cpu_seconds']:5.2f} | {row['in_process_build_seconds']:20.2f}"
            f" | {row['rss_mb']:6.0f} | {row['rss_mb'] - baseline_rss:14.0f}"
            f" | {row['tick_ms_median']:.1f} / {row['tick_ms_p95']:.1f}"
        )
    verdicts = {}
    if "100" in summary:
        ratio = summary["100"]["load_seconds"] / LOAD_TARGET_SECONDS
        verdicts["load_100_over_target"] = round(ratio, 3)
        print(f"load at 100 ÷ {LOAD_TARGET_SECONDS:.0f} s target: {ratio:.2f} "
              f"({'met' if ratio < 1 else 'NOT met'})")  # fmt: skip
    worst_tick = max(row["tick_ms_p95"] for row in summary.values())
    verdicts["tick_p95_over_target"] = round(worst_tick / TICK_TARGET_MS, 3)
    verdict = "met" if worst_tick < TICK_TARGET_MS else "NOT met"
    print(f"idle tick p95 (worst size) ÷ {TICK_TARGET_MS:.0f} ms target: "
          f"{worst_tick / TICK_TARGET_MS:.2f} ({verdict})")  # fmt: skip
    comparison = {}
    for size, runs in results["compared"].items():
        theirs = {
            k: median([r[k] for r in runs]) for k in ("load_seconds", "load_cpu_seconds", "rss_mb")
        }
        ours = summary[size]
        comparison[size] = {
            **{f"compared_{k}": v for k, v in theirs.items()},
            **{f"{k}_ratio": round(ours[k] / theirs[k], 3) for k in theirs},
        }
        ratios = comparison[size]
        print(
            f"{size} collections, ours ÷ {args.compare}: "
            + ", ".join(f"{k} {ratios[f'{k}_ratio']:.2f}" for k in theirs)
        )
    path = write_result(
        "definitions_scale",
        {
            "code": measured_code(),
            "compared_code": measured_code(args.compare) if args.compare else None,
            "comparison": comparison,
            "machine_at_end": machine(),
            "baseline": results["baseline"],
            "sizes": results["sizes"],
            "compared": results["compared"],
            "summary": summary,
            "verdicts": verdicts,
        },
    )
    print(f"result: {path}")


if __name__ == "__main__":
    main()
