"""`make run`: the whole product on one machine, with no configuration.

Without `MONGO_URI` it uses the embedded store (montydb files under `.certyo_run/mongo`), seeds
the demo catalog once and keeps it changing; without `CERTYO_BASE_URL` it starts
`certyo-sandbox` with a short flush interval so anchoring shows within minutes. Then it runs
`dagster dev` with sensors and schedules on. Everything it starts runs in a process group of
its own, so Ctrl-C or SIGTERM stops all of it, including the webserver's and daemon's children.

`start_stack` does the work and returns a `Stack` handle; `main()` and the e2e test share it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import requests

from certyo_dagster.source.mongo import redact_uri
from certyo_demo.servers import free_port, signal_group
from certyo_sandbox.config import DEFAULT_API_KEY, DEFAULT_TENANT

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_DIR_NAME = ".certyo_run"
DEMO_HOURS = 4
SANDBOX_FLUSH_SECONDS = 10
SANDBOX_FLUSH_RECORDS = 500
SANDBOX_ANCHOR_DELAY_SECONDS = 5
STOP_GRACE_SECONDS = 10


class LaunchError(RuntimeError):
    """Part of the stack did not start; the message says which part and where its log is."""


def default_run_dir() -> Path:
    return Path.cwd() / RUN_DIR_NAME


def embedded_uri(run_dir: Path) -> str:
    return f"montydb://{(run_dir / 'mongo').resolve()}"


def _floor_hour(ts: datetime) -> datetime:
    return ts.replace(minute=0, second=0, microsecond=0)


@dataclass
class Stack:
    """What `start_stack` started. `stop()` ends all of it; it is safe to call twice."""

    run_dir: Path
    env: dict[str, str]
    dagster_url: str
    sandbox_url: str | None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    seeded: int = 0

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes.values()]

    def graphql(self, query: str, **variables: object) -> dict:
        """Ask the webserver's GraphQL API; raises on transport or GraphQL errors."""
        response = requests.post(
            f"{self.dagster_url}/graphql",
            json={"query": query, "variables": variables},
            timeout=30,
        )
        response.raise_for_status()
        body = response.json()
        if body.get("errors"):
            raise RuntimeError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def wait_for_webserver(
        self, timeout: float = 120.0, stop: threading.Event | None = None
    ) -> bool:
        """True once the Dagster webserver answers; False if `stop` is set first.

        LaunchError, with the end of its log, if dagster dev exits or the time runs out.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                return False
            dagster = self.processes.get("dagster")
            if dagster is not None and dagster.poll() is not None:
                raise LaunchError(
                    f"dagster dev exited with {dagster.returncode}:\n{self.log_tail('dagster')}"
                )
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.dagster_url}/server_info", timeout=2).ok:
                    return True
            time.sleep(0.5)
        raise LaunchError(
            f"the Dagster webserver did not answer within {timeout:.0f} s:\n"
            f"{self.log_tail('dagster')}"
        )

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return f"(no log at {path})"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGINT each process group (what Ctrl-C does), then SIGKILL what is left."""
        started = list(self.processes.items())
        for _, process in reversed(started):
            signal_group(process, signal.SIGINT)
        deadline = time.monotonic() + grace
        for _, process in reversed(started):
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.1, deadline - time.monotonic()))
        for _, process in started:
            # The leader may be gone while its children (webserver, daemon, runs) still live.
            signal_group(process, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
        self.processes.clear()


def _spawn(
    name: str, args: list[str], env: Mapping[str, str], log_dir: Path, cwd: Path = REPO_ROOT
) -> subprocess.Popen:
    log = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it from here
    try:
        return subprocess.Popen(
            args,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() reaches every descendant
        )
    finally:
        log.close()


def _wait_healthy(url: str, process: subprocess.Popen, what: str, log: Path, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LaunchError(f"{what} exited with {process.returncode}; see {log}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=1).ok:
                return
        time.sleep(0.1)
    raise LaunchError(f"{what} did not become healthy within {timeout:.0f} s; see {log}")


def _demo_state(run_dir: Path, now: datetime) -> dict[str, str]:
    """The partition start chosen on first launch, kept so restarts see the same hours."""
    path = run_dir / "demo.json"
    if path.exists():
        return json.loads(path.read_text())
    start = _floor_hour(now) - timedelta(hours=DEMO_HOURS)
    state = {"partition_start": start.strftime("%Y-%m-%dT%H:%M")}
    path.write_text(json.dumps(state))
    return state


def prepare_dagster_home(run_dir: Path) -> Path:
    home = run_dir / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    source = REPO_ROOT / "dagster.yaml"
    if source.exists():
        shutil.copyfile(source, home / "dagster.yaml")
    return home


def start_stack(
    run_dir: Path,
    *,
    dagster_port: int,
    sandbox_port: int | None = None,
    environ: Mapping[str, str] | None = None,
    seed_count: int = 3000,
    churn_interval: float = 5.0,
    churn: bool = True,
    seed_hours: float = DEMO_HOURS,
    start_dagster: bool = True,
    now: datetime | None = None,
) -> Stack:
    """Start the sandbox, seed and churn (when not configured otherwise) and `dagster dev`.

    On any failure everything already started is stopped before the error propagates.
    """
    environ = dict(os.environ if environ is None else environ)
    run_dir = run_dir.resolve()
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    now = now or datetime.now(timezone.utc).replace(tzinfo=None)

    env = dict(environ)
    env["DAGSTER_HOME"] = str(prepare_dagster_home(run_dir))
    env["PYTHONUNBUFFERED"] = "1"
    embedded = not env.get("MONGO_URI", "").strip()
    with_sandbox = not env.get("CERTYO_BASE_URL", "").strip()
    if not with_sandbox and not env.get("CERTYO_API_KEY", "").strip():
        raise LaunchError("CERTYO_BASE_URL is set but CERTYO_API_KEY is not: set both")
    if not with_sandbox and not env.get("CERTYO_TENANT_ID", "").strip():
        # The product has no default tenant: say so now rather than in the first run.
        raise LaunchError("CERTYO_BASE_URL is set but CERTYO_TENANT_ID is not: set both")
    if not embedded and with_sandbox:
        # The sandbox's fake anchoring would label real documents `anchored` for good.
        raise LaunchError(
            "MONGO_URI is set but CERTYO_BASE_URL is not: set CERTYO_BASE_URL, "
            "CERTYO_API_KEY and CERTYO_TENANT_ID to use your MongoDB, or unset MONGO_URI for "
            "the demo (embedded store and sandbox)"
        )
    if embedded:
        env["MONGO_URI"] = embedded_uri(run_dir)
        env.setdefault("CERTYO_PARTITION_START", _demo_state(run_dir, now)["partition_start"])
    stack = Stack(
        run_dir=run_dir,
        env=env,
        dagster_url=f"http://127.0.0.1:{dagster_port}",
        sandbox_url=None,
    )
    try:
        if with_sandbox:
            port = sandbox_port or free_port(8080)
            stack.sandbox_url = f"http://127.0.0.1:{port}"
            env.update(
                CERTYO_BASE_URL=stack.sandbox_url,
                CERTYO_API_KEY=DEFAULT_API_KEY,  # the sandbox's public development key
                CERTYO_TENANT_ID=DEFAULT_TENANT,
            )
            env.pop("CERTYO_SANDBOX_API_KEYS", None)  # the sandbox then accepts the dev key
            stack.processes["sandbox"] = _spawn(
                "sandbox",
                [
                    sys.executable,
                    "-m",
                    "certyo_sandbox.cli",
                    "--host=127.0.0.1",
                    f"--port={port}",
                    f"--db={run_dir / 'certyo-sandbox.db'}",
                    f"--flush-seconds={SANDBOX_FLUSH_SECONDS}",
                    f"--flush-records={SANDBOX_FLUSH_RECORDS}",
                    f"--anchor-delay-seconds={SANDBOX_ANCHOR_DELAY_SECONDS}",
                ],
                env,
                log_dir,
            )
            _wait_healthy(
                f"{stack.sandbox_url}/healthz",
                stack.processes["sandbox"],
                "certyo-sandbox",
                log_dir / "sandbox.log",
                30,
            )
        if embedded:
            env["CERTYO_DEMO_MODE"] = "1"
        if embedded:
            stack.seeded = _seed(env, seed_count, seed_hours, now)
        if embedded and churn:
            stack.processes["churn"] = _spawn(
                "churn",
                [
                    sys.executable,
                    "-m",
                    "certyo_demo",
                    "churn",
                    f"--interval={churn_interval}",
                ],
                env,
                log_dir,
            )
        if start_dagster:
            stack.processes["dagster"] = _spawn(
                "dagster",
                [
                    sys.executable,
                    "-m",
                    "dagster",
                    "dev",
                    "-w",
                    str(REPO_ROOT / "workspace.yaml"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(dagster_port),
                ],
                env,
                log_dir,
                # From the repo root Dagster would warn that its dagster.yaml is not the
                # instance's (the launcher copied it into DAGSTER_HOME).
                cwd=Path(env["DAGSTER_HOME"]),
            )
    except BaseException:
        stack.stop()
        raise
    return stack


def _seed(env: Mapping[str, str], count: int, hours: float, now: datetime) -> int:
    from certyo_dagster.settings import DEFAULT_DATABASE
    from certyo_dagster.source.mongo import close_all_clients, open_client
    from certyo_demo.store import seed_catalog

    database = env.get("MONGO_DATABASE", "").strip() or DEFAULT_DATABASE
    collection = env.get("CERTYO_COLLECTIONS", "").split(",")[0].split(":")[0].strip()
    try:
        products = open_client(env["MONGO_URI"])[database][collection or "products"]
        result = seed_catalog(products, count=count, hours=hours, now=now)
    finally:
        close_all_clients()
    return result.inserted


def _describe(stack: Stack) -> str:
    env = stack.env
    lines = [
        "",
        f"  Dagster UI      {stack.dagster_url}",
        f"  MongoDB         {redact_uri(env['MONGO_URI'])}",
    ]
    if stack.sandbox_url:
        lines.append(
            f"  Certyo sandbox  {stack.sandbox_url} (stats: {stack.sandbox_url}/_sandbox/stats)"
        )
    else:
        lines.append(f"  Certyo          {env.get('CERTYO_BASE_URL')}")
    if stack.seeded:
        lines.append(
            f"  Demo catalog    {stack.seeded} products seeded; churn edits a few every 5 s"
        )
    lines += [
        f"  Data and logs   {stack.run_dir} (logs in {stack.log_dir})",
        "  Stop            Ctrl-C",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    run_dir = Path(os.environ.get("CERTYO_RUN_DIR", "").strip() or default_run_dir())
    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        stop_requested.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    started = time.monotonic()
    print(f"certyo_dagster: starting in {run_dir} ...", flush=True)
    stack = start_stack(run_dir, dagster_port=free_port(3000))
    try:
        if not stack.wait_for_webserver(stop=stop_requested):
            return 130
        print(_describe(stack), flush=True)
        print(f"ready in {time.monotonic() - started:.0f} s", flush=True)
        while not stop_requested.wait(1.0):
            for name, process in stack.processes.items():
                if process.poll() is not None:
                    print(f"{name} exited with {process.returncode}:\n{stack.log_tail(name)}")
                    return 1
    except LaunchError as exc:
        print(f"certyo_dagster: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        print("stopping ...", flush=True)
        stack.stop()
        print("stopped.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
