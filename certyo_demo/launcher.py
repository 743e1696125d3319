"""`make run`: the whole product on one machine, with no configuration.

Without `MONGO_URI` it starts SecantusDB (data in `.certyo_run/secantus`), seeds the demo
catalog once and keeps it changing; without `CERTYO_BASE_URL` it starts `certyo-sandbox` with
a short flush interval so anchoring shows within minutes. It checks that MongoDB and Certyo
answer, then runs `dg dev`. Everything it starts runs in a process group of its own, so
Ctrl-C or SIGTERM stops all of it, including the webserver's and daemon's children.

Settings are checked before anything starts, and every problem is one line, never a
traceback. One run at a time owns a run folder (`run.lock`, released by the kernel even when
the launcher is killed), and a run first stops what a killed one left running there.
`env.sh` in the run folder holds the stack's environment for a second shell.

`start_stack` does the work and returns a `Stack` handle; `main()`, `make demo` and the e2e
test share it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO

import dagster as dg
import pymongo
import requests
from pymongo.errors import ConfigurationError, OperationFailure, PyMongoError

from certyo_dagster.settings import CAPTURE_MODES, ConfigError, PipelineSettings
from certyo_dagster.ship.client import CertyoClient
from certyo_dagster.ship.resource import INSECURE_HTTP_ENV
from certyo_dagster.source.mongo import redact_uri
from certyo_dagster.wiring import build_definitions
from certyo_demo.servers import LocalChain, SecantusServer, ServerError, free_port, signal_group
from certyo_sandbox.config import DEFAULT_API_KEY as SANDBOX_API_KEY
from certyo_sandbox.config import DEFAULT_TENANT as SANDBOX_TENANT

RUN_DIR_NAME = ".certyo_run"
RUN_DIR_ENV = "CERTYO_RUN_DIR"
# Set in the environment of every process a run starts (and inherited by their children), so
# the next run in the folder can find what a crashed one left running.
RUN_OWNER_ENV = "CERTYO_RUN_OWNER"
UI_PORT = 3000
MONGO_PORT = 27017
SANDBOX_PORT = 8080
SECANTUS_DIR = "secantus"
# Where earlier versions kept the demo data, in a file format SecantusDB cannot read.
OLD_STORE_DIR = "mongo"
LOCK_FILE = "run.lock"
ENV_FILE = "env.sh"
DEMO_HOURS = 4
SANDBOX_FLUSH_SECONDS = 10
SANDBOX_FLUSH_RECORDS = 500
SANDBOX_ANCHOR_DELAY_SECONDS = 5
STOP_GRACE_SECONDS = 10
REACH_TIMEOUT_SECONDS = 5.0
# Environment names whose values are secrets: env.sh never writes them (except the sandbox's
# public development key).
_SECRET_WORDS = ("KEY", "PASSWORD", "SECRET", "TOKEN")


class LaunchError(RuntimeError):
    """Part of the stack cannot start; the message says which part and what to do."""


def default_run_dir() -> Path:
    return Path.cwd() / RUN_DIR_NAME


def _floor_hour(ts: datetime) -> datetime:
    return ts.replace(minute=0, second=0, microsecond=0)


class RunLock:
    """One launcher per run folder: an exclusive `flock` on `run.lock`, holding its pid.

    The kernel drops the lock when the process ends, however it ends, so a crashed run never
    leaves the folder locked; the pid in the file only names the holder in the message.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self) -> RunLock:
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for as long as the run lasts
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise LaunchError(
                f"another `make run` (pid {holder}) is using {self.path.parent}: stop it first "
                f"(Ctrl-C in its terminal), or set {RUN_DIR_ENV} to another folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self._file.close()  # closing drops the lock
            self._file = None


@dataclass
class Stack:
    """What `start_stack` started. `stop()` ends all of it; it is safe to call twice."""

    run_dir: Path
    env: dict[str, str]
    dagster_url: str
    sandbox_url: str | None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    mongo_server: SecantusServer | None = None
    seeded: int = 0
    notes: list[str] = field(default_factory=list)
    lock: RunLock | None = None

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def env_file(self) -> Path:
        return self.run_dir / ENV_FILE

    @property
    def demo(self) -> bool:
        return self.mongo_server is not None

    def pids(self) -> list[int]:
        pids = [p.pid for p in self.processes.values()]
        if self.mongo_server is not None and self.mongo_server.process is not None:
            pids.append(self.mongo_server.process.pid)
        return pids

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

        LaunchError, with the end of its log, if dg dev exits or the time runs out.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                return False
            dagster = self.processes.get("dagster")
            if dagster is not None and dagster.poll() is not None:
                raise LaunchError(
                    f"dg dev exited with {dagster.returncode}:\n{self.log_tail('dagster')}"
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
        return _tail(self.log_dir / f"{name}.log", lines)

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGINT each process group (what Ctrl-C does), then SIGKILL what is left; the
        database last, since everything else writes to it."""
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
        if self.mongo_server is not None:
            self.mongo_server.stop(grace)
        # Its ports are gone with the stack; a stale file would point a shell at nothing.
        with contextlib.suppress(OSError):
            self.env_file.unlink()
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _leftovers(run_dir: Path) -> list[int]:
    """Live processes an earlier run in `run_dir` started: marked by RUN_OWNER_ENV, or the
    SecantusDB server on its storage (which is started with the launcher's environment)."""
    marker = f"{RUN_OWNER_ENV}={run_dir}".encode() + b"\0"
    storage = str(run_dir / SECANTUS_DIR).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if state == "Z":
            continue
        secantus = b"--storage-path" in cmdline and storage in cmdline
        if secantus or marker in environ:
            found.append(int(entry.name))
    return sorted(found)


def stop_leftovers(run_dir: Path, grace: float = STOP_GRACE_SECONDS) -> list[int]:
    """SIGTERM what a run that was killed left running in `run_dir`, then SIGKILL it after
    `grace` seconds; the pids. Only called while holding the folder's lock, so no live run
    owns them."""
    pids = _leftovers(run_dir)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and set(_leftovers(run_dir)) & set(pids):
        time.sleep(0.2)
    for pid in set(_leftovers(run_dir)) & set(pids):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return pids


def _spawn(
    name: str, args: list[str], env: Mapping[str, str], log_dir: Path, cwd: Path
) -> subprocess.Popen:
    log = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it from here
    try:
        return subprocess.Popen(
            args,
            cwd=cwd,
            env={**env, RUN_OWNER_ENV: str(log_dir.parent)},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() reaches every descendant
        )
    finally:
        log.close()


def _start_local_chain(stack: Stack, log_dir: Path) -> list[str]:
    """Start a local EVM chain for the sandbox to anchor on; the sandbox's arguments for it.

    Without Node.js or ganache (`make install` puts it in certyo_demo/chain) the sandbox
    simulates its transactions instead, and this says so.
    """
    # Marked like every process of the run, so the next run finds it if this one is killed.
    chain = LocalChain(
        log_path=log_dir / "chain.log",
        environment={**os.environ, RUN_OWNER_ENV: str(log_dir.parent)},
    )
    try:
        chain.start()
    except ServerError as exc:
        print(f"no local chain ({exc}); the sandbox simulates transactions", file=sys.stderr)
        return []
    assert chain.process is not None
    stack.processes["chain"] = chain.process
    return [f"--chain-rpc={chain.url}"]


def _tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return f"(no log at {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _wait_healthy(url: str, process: subprocess.Popen, what: str, log: Path, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LaunchError(
                f"{what} exited with {process.returncode}; the end of {log}:\n{_tail(log, 15)}"
            )
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


def discard_old_store(run_dir: Path) -> str | None:
    """Remove the demo state of a run folder written by the old embedded store; the message.

    The old store's files cannot be read by SecantusDB, and the cursors, run history and
    sandbox records kept beside them describe documents that are gone, so all of it goes and
    the demo starts over with a fresh catalog.
    """
    old = run_dir / OLD_STORE_DIR
    if not old.is_dir():
        return None
    for name in (OLD_STORE_DIR, "dagster_home", "demo.json", "certyo-sandbox.db"):
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return (
        f"{old} holds demo data of the old embedded store (montydb), which SecantusDB cannot "
        "read: removed it; the demo starts over with a fresh catalog"
    )


def prepare_dagster_home(run_dir: Path, instance_config: Path | None) -> Path:
    """`run_dir/dagster_home`, with `instance_config` (the repository's dagster.yaml) in it."""
    home = run_dir / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    if instance_config is not None:
        if not instance_config.is_file():
            raise LaunchError(
                f"the Dagster instance config {instance_config} does not exist: run `make run` "
                "from the repository root"
            )
        shutil.copyfile(instance_config, home / "dagster.yaml")
    return home


def check_settings(env: Mapping[str, str]) -> PipelineSettings:
    """Every setting the stack will read, checked before anything starts; LaunchError names
    the variable."""
    with_sandbox = not env.get("CERTYO_BASE_URL", "").strip()
    if not with_sandbox:
        missing = [n for n in ("CERTYO_API_KEY", "CERTYO_TENANT_ID") if not env.get(n, "").strip()]
        if missing:
            raise LaunchError(f"CERTYO_BASE_URL is set but {' and '.join(missing)} not: set both")
    elif env.get("MONGO_URI", "").strip():
        # The sandbox's fake anchoring would label real documents `anchored` for good.
        raise LaunchError(
            "MONGO_URI is set but CERTYO_BASE_URL is not: set CERTYO_BASE_URL, "
            "CERTYO_API_KEY and CERTYO_TENANT_ID to use your MongoDB, or unset MONGO_URI for "
            "the demo (SecantusDB and the sandbox)"
        )
    try:
        settings = PipelineSettings.from_env(env)
    except ConfigError as exc:
        raise LaunchError(str(exc)) from None
    try:
        # What the code location will build, so a bad cron is refused here, not in the UI.
        dg.Definitions.validate_loadable(build_definitions(settings))
    except dg.DagsterError as exc:
        raise LaunchError(str(exc).strip().splitlines()[0]) from None
    if not with_sandbox:
        insecure = env.get(INSECURE_HTTP_ENV, "").strip().lower() in ("1", "true", "yes")
        try:
            CertyoClient(
                env["CERTYO_BASE_URL"].strip(),
                env["CERTYO_API_KEY"].strip(),
                env["CERTYO_TENANT_ID"].strip(),
                allow_insecure_http=insecure,
            ).close()
        except ValueError as exc:
            # The client's messages name the setting and never hold the key.
            raise LaunchError(f"Certyo settings: {exc}") from None
    return settings


def _first_line(text: str) -> str:
    """pymongo's and urllib3's errors without the topology dump and retry wrapping."""
    errno = re.search(r"\[Errno -?\d+\] [^'\"()\]]+", text)
    if errno:
        return errno.group(0).strip()
    text = text.split(" (configured timeouts")[0].split(", Timeout:")[0]
    return text.splitlines()[0] if text else "no answer"


def check_mongo(uri: str, timeout: float = REACH_TIMEOUT_SECONDS) -> None:
    """LaunchError, with the redacted URI and the reason in one line, unless MongoDB answers
    a ping (and accepts the credentials in `uri`)."""
    shown = redact_uri(uri)
    try:
        client = pymongo.MongoClient(
            uri,
            serverSelectionTimeoutMS=int(timeout * 1000),
            connectTimeoutMS=int(timeout * 1000),
            connect=False,
            appname="certyo-launcher",
        )
    except (ConfigurationError, ValueError) as exc:
        password = uri.split("://", 1)[-1].rpartition("@")[0].partition(":")[2]
        reason = str(exc).replace(uri, shown)
        if password:
            reason = reason.replace(password, "***")
        raise LaunchError(f"MONGO_URI {shown} is not a usable MongoDB URI: {reason}") from None
    try:
        client.admin.command("ping")
    except OperationFailure as exc:
        raise LaunchError(
            f"MongoDB at {shown} refused the connection: {exc.details.get('errmsg', exc)}"
            if exc.details
            else f"MongoDB at {shown} refused the connection: {exc}"
        ) from None
    except PyMongoError as exc:
        raise LaunchError(
            f"MongoDB at {shown} cannot be reached: {_first_line(str(exc))}"
        ) from None
    finally:
        client.close()


def check_certyo(base_url: str, api_key: str, timeout: float = REACH_TIMEOUT_SECONDS) -> None:
    """LaunchError unless Certyo answers over HTTP and does not refuse the API key."""
    url = f"{base_url.rstrip('/')}/api/v1/records"
    try:
        response = requests.get(
            url, params={"limit": 1}, headers={"X-API-Key": api_key}, timeout=(timeout, 10)
        )
    except requests.Timeout:
        raise LaunchError(
            f"Certyo at {base_url} cannot be reached: no answer within {timeout:.0f} s"
        ) from None
    except requests.RequestException as exc:
        raise LaunchError(
            f"Certyo at {base_url} cannot be reached: {_first_line(str(exc))}"
        ) from None
    if response.status_code in (401, 403):
        raise LaunchError(
            f"Certyo at {base_url} refused CERTYO_API_KEY ({response.status_code}): check "
            "CERTYO_API_KEY and CERTYO_TENANT_ID"
        )


def write_env_file(stack: Stack) -> Path:
    """`run_dir/env.sh`: the stack's environment for a second shell, without secrets.

    The sandbox's development key is public and is written; any other key, and a MongoDB
    URI with a password, is left for the user to export.
    """
    env = stack.env
    names = sorted(
        n
        for n in env
        if (n.startswith(("CERTYO_", "MONGO_")) or n == "DAGSTER_HOME")
        and not n.startswith(("CERTYO_TEST_", "CERTYO_SANDBOX_"))
        and n not in (RUN_DIR_ENV, RUN_OWNER_ENV)
    )
    lines = [
        f"# The environment of `make run` in {stack.run_dir}, for the CLI in a second shell:",
        f"#   source {_shown_path(stack.env_file)}",
    ]
    for name in names:
        value = env[name]
        if name == "MONGO_URI" and redact_uri(value) != value:
            lines.append(f"# MONGO_URI holds a password; export it yourself: {redact_uri(value)}")
        elif any(word in name for word in _SECRET_WORDS) and value != SANDBOX_API_KEY:
            lines.append(f"# {name} is a secret; export it yourself")
        else:
            lines.append(f"export {name}={shlex.quote(value)}")
    path = stack.env_file
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def _shown_path(path: Path) -> str:
    """`path` relative to the working directory when it is inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _port(preferred: int, what: str, notes: list[str]) -> int:
    port = free_port(preferred)
    if port != preferred:
        notes.append(f"port {preferred} is in use, so {what} is on port {port}")
    return port


def start_stack(
    run_dir: Path,
    *,
    dagster_port: int,
    sandbox_port: int | None = None,
    mongo_port: int | None = None,
    environ: Mapping[str, str] | None = None,
    instance_config: Path | None = None,
    workspace: Path | None = None,
    seed_count: int = 3000,
    churn_interval: float = 5.0,
    churn: bool = True,
    seed_hours: float = DEMO_HOURS,
    start_dagster: bool = True,
    now: datetime | None = None,
    report: Callable[[str], None] = lambda line: None,
) -> Stack:
    """Check the settings, start SecantusDB and the sandbox (unless configured otherwise),
    check both answer, seed and churn the demo catalog, and start `dg dev`.

    `instance_config` is copied into DAGSTER_HOME; `workspace` is what `dg dev` loads.
    `report` receives lines worth telling the user while starting. On any failure everything
    already started is stopped before the error propagates.
    """
    environ = dict(os.environ if environ is None else environ)
    env = dict(environ)
    demo = not env.get("MONGO_URI", "").strip()
    with_sandbox = not env.get("CERTYO_BASE_URL", "").strip()
    check_settings(env)
    if start_dagster and (workspace is None or not workspace.is_file()):
        raise LaunchError(f"the Dagster workspace {workspace} does not exist")

    run_dir = run_dir.resolve()
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir).acquire()
    stack = Stack(
        run_dir=run_dir,
        env=env,
        dagster_url=f"http://127.0.0.1:{dagster_port}",
        sandbox_url=None,
        lock=lock,
    )
    try:
        left = stop_leftovers(run_dir)
        if left:
            report(
                f"stopped what an earlier run in {run_dir} left running when it was killed "
                f"(pids {', '.join(map(str, left))})"
            )
        now = now or datetime.now(timezone.utc).replace(tzinfo=None)
        if demo:
            discarded = discard_old_store(run_dir)
            if discarded:
                report(discarded)
        env["DAGSTER_HOME"] = str(prepare_dagster_home(run_dir, instance_config))
        env["PYTHONUNBUFFERED"] = "1"
        if demo:
            env.setdefault("CERTYO_PARTITION_START", _demo_state(run_dir, now)["partition_start"])
            port = mongo_port or _port(MONGO_PORT, "SecantusDB", stack.notes)
            server = SecantusServer(
                run_dir / SECANTUS_DIR,
                port=port,
                log_path=log_dir / "secantus.log",
                # Oplog no-ops, as a MongoDB replica set writes them: a quiet collection's
                # change-stream position keeps advancing.
                extra_args=["--noop-heartbeat-seconds", "10"],
            )
            stack.mongo_server = server
            server.start()
            env["MONGO_URI"] = server.uri
            env["CERTYO_DEMO_MODE"] = "1"
        if with_sandbox:
            port = sandbox_port or _port(SANDBOX_PORT, "the sandbox", stack.notes)
            stack.sandbox_url = f"http://127.0.0.1:{port}"
            env.update(
                CERTYO_BASE_URL=stack.sandbox_url,
                CERTYO_API_KEY=SANDBOX_API_KEY,
                CERTYO_TENANT_ID=SANDBOX_TENANT,
            )
            env.pop("CERTYO_SANDBOX_API_KEYS", None)  # the sandbox then accepts the dev key
            chain_args = _start_local_chain(stack, log_dir)
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
                    *chain_args,
                ],
                env,
                log_dir,
                run_dir,
            )
            _wait_healthy(
                f"{stack.sandbox_url}/healthz",
                stack.processes["sandbox"],
                "certyo-sandbox",
                log_dir / "sandbox.log",
                30,
            )
        check_mongo(env["MONGO_URI"])
        check_certyo(env["CERTYO_BASE_URL"], env["CERTYO_API_KEY"])
        settings = PipelineSettings.from_env(env)
        if demo:
            stack.seeded = _seed(env, settings, seed_count, seed_hours, now)
        if demo and churn:
            stack.processes["churn"] = _spawn(
                "churn",
                [
                    sys.executable,
                    "-m",
                    "certyo_demo",
                    "--collection",
                    settings.collections[0].collection,
                    "churn",
                    f"--interval={churn_interval}",
                ],
                env,
                log_dir,
                run_dir,
            )
        write_env_file(stack)
        if start_dagster:
            assert workspace is not None
            stack.processes["dagster"] = _spawn(
                "dagster",
                [
                    # dg's dev command: the same webserver and daemon as `dagster dev`, which
                    # Dagster now marks as superseded by it.
                    str(Path(sys.executable).with_name("dg")),
                    "dev",
                    "-w",
                    str(workspace.resolve()),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(dagster_port),
                ],
                env,
                log_dir,
                # Dagster warns when the working directory holds a dagster.yaml that is not
                # the instance's; DAGSTER_HOME holds the copy.
                Path(env["DAGSTER_HOME"]),
            )
    except BaseException:
        stack.stop()
        raise
    return stack


def _seed(
    env: Mapping[str, str], settings: PipelineSettings, count: int, hours: float, now: datetime
) -> int:
    from certyo_dagster.source.mongo import close_all_clients, open_client
    from certyo_demo.store import seed_catalog

    spec = settings.collections[0]
    try:
        products = open_client(env["MONGO_URI"])[spec.database][spec.collection]
        result = seed_catalog(products, count=count, hours=hours, now=now)
    finally:
        close_all_clients()
    return result.inserted


def describe(stack: Stack) -> str:
    """The banner: where everything is, and what to do next."""
    env = stack.env
    settings = PipelineSettings.from_env(env)
    spec = settings.collections[0]
    mongo = redact_uri(env["MONGO_URI"])
    if stack.mongo_server is not None:
        mongo = f"SecantusDB {mongo} (data in {stack.mongo_server.storage})"
    lines = ["", f"  Dagster UI      {stack.dagster_url}", f"  MongoDB         {mongo}"]
    if stack.sandbox_url:
        lines.append(f"  Certyo sandbox  {stack.sandbox_url}")
    else:
        lines.append(f"  Certyo          {env.get('CERTYO_BASE_URL')}")
    if stack.seeded:
        lines.append(
            f"  Demo catalog    {stack.seeded} products seeded; churn edits a few every 5 s"
        )
    lines.append(f"  Capture         {spec.capture} (CERTYO_CAPTURE: {', '.join(CAPTURE_MODES)})")
    asset = f"{spec.database}/{spec.collection}/anchoring_status"
    lines.append(f"  Anchored docs   asset {asset}: {stack.dagster_url}/assets/{asset}")
    if stack.sandbox_url:
        lines.append(f"                  sandbox counts: {stack.sandbox_url}/_sandbox/stats")
    if not settings.demo_mode:
        lines += [
            "  Automation      sensors and schedules start STOPPED: turn them on in the UI "
            f"({stack.dagster_url}/automation),",
            "                  or: dagster sensor start --start-all -w workspace.yaml; "
            "dagster schedule start --start-all -w workspace.yaml",
        ]
    lines += [
        f"  Second shell    source {_shown_path(stack.env_file)}   (for the CLI commands)",
        f"  Data and logs   {stack.run_dir} (logs in {stack.log_dir})",
        "  Stop            Ctrl-C",
    ]
    lines += [f"  Note            {note}" for note in stack.notes]
    return "\n".join([*lines, ""])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m certyo_demo.launcher",
        description="Start the demo stack (what `make run` does).",
    )
    parser.add_argument(
        "--instance-config",
        type=Path,
        default=Path("dagster.yaml"),
        help="Dagster instance config copied into DAGSTER_HOME (dagster.yaml)",
    )
    parser.add_argument(
        "--workspace",
        type=Path,
        default=Path("workspace.yaml"),
        help="Dagster workspace that dg dev loads (workspace.yaml)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_dir = Path(os.environ.get(RUN_DIR_ENV, "").strip() or default_run_dir())
    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        stop_requested.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    started = time.monotonic()
    print(f"certyo_dagster: starting in {run_dir} ...", flush=True)
    notes: list[str] = []
    try:
        ui_port = _port(UI_PORT, "the Dagster UI", notes)
        stack = start_stack(
            run_dir,
            dagster_port=ui_port,
            instance_config=args.instance_config,
            workspace=args.workspace,
            report=lambda line: print(f"certyo_dagster: {line}", flush=True),
        )
    except (LaunchError, ServerError) as exc:
        print(f"certyo_dagster: {exc}", file=sys.stderr, flush=True)
        return 1
    stack.notes[:0] = notes
    try:
        if not stack.wait_for_webserver(stop=stop_requested):
            return 130
        print(describe(stack), flush=True)
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
