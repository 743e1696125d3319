"""Ways to run the sandbox: in a background thread (tests) or as a subprocess (benchmarks).

`SandboxServer` runs uvicorn in a thread of the current process, which is cheap and lets
tests restart it on the same database file. `SandboxProcess` runs the CLI as a separate
process, so a benchmark's client never shares a GIL with the server it measures.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import requests
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from certyo_sandbox.app import TRANSPORT_SCOPE_KEY, SandboxApp
from certyo_sandbox.config import SandboxConfig

__all__ = ["SandboxConfig", "SandboxHttpProtocol", "SandboxProcess", "SandboxServer"]

API_KEYS_ENV = "CERTYO_SANDBOX_API_KEYS"
_START_TIMEOUT_SECONDS = 20.0


class SandboxH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, exposing the transport so a fault can drop the socket.

    `handle_events` creates the request's scope and schedules the app task; the task has
    not run yet when it returns, so the app finds the transport in `scope["extensions"]`
    and can `abort()` it. The client then sees a reset connection with no response at
    all, which Starlette alone cannot produce.
    """

    def handle_events(self) -> None:
        super().handle_events()
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope.setdefault("extensions", {})[TRANSPORT_SCOPE_KEY] = self.transport


try:  # httptools (uvicorn[standard]) parses large bodies several times faster than h11
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - depends on the installed extras
    SandboxHttpProtocol: type = SandboxH11Protocol
else:

    class SandboxHttpToolsProtocol(HttpToolsProtocol):
        """httptools flavour of `SandboxH11Protocol`: the scope is made per message."""

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.scope["extensions"] = {TRANSPORT_SCOPE_KEY: self.transport}  # type: ignore[typeddict-unknown-key]

    SandboxHttpProtocol = SandboxHttpToolsProtocol


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket; port 0 picks a free one."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def uvicorn_config(
    app: SandboxApp, *, loop: str = "auto", access_log: bool = False
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http=SandboxHttpProtocol,
        loop=loop,
        lifespan="on",
        access_log=access_log,
        log_level="warning",
        timeout_graceful_shutdown=2,
        # The sandbox enforces its own body limit; keep-alive lets it drain refused bodies.
        timeout_keep_alive=30,
    )


class _SandboxControls:
    """Test helpers that drive a running sandbox's `/_sandbox/*` endpoints over real HTTP."""

    host = "127.0.0.1"
    port: int
    _session: requests.Session

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def script_faults(self, faults: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append fault entries (see `POST /_sandbox/faults`); returns the whole script."""
        return self._control("POST", "/_sandbox/faults", {"faults": faults})["faults"]

    def clear_faults(self) -> None:
        self._control("DELETE", "/_sandbox/faults")

    def stats(self) -> dict[str, Any]:
        return self._control("GET", "/_sandbox/stats")

    def flush(self) -> int:
        """Anchor everything pending now; returns how many records were flushed."""
        return self._control("POST", "/_sandbox/flush", {})["flushed"]

    def _control(self, method: str, path: str, body: Any = None) -> Any:
        response = self._session.request(method, self.base_url + path, json=body, timeout=10)
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path} answered {response.status_code}: {response.text}")
        return response.json()


class SandboxServer(_SandboxControls):
    """A sandbox on 127.0.0.1 in a background thread; a context manager.

    `stop()` then `start()` reopens the same `db_path` (on the same port when it is still
    free), which is how restart-persistence is tested.
    """

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._session = requests.Session()

    def start(self) -> SandboxServer:
        if self._thread is not None:
            raise RuntimeError("sandbox server is already running")
        try:
            sock = bind_socket(self.host, self.port)
        except OSError:
            sock = bind_socket(self.host, 0)
        self.port = sock.getsockname()[1]
        # "auto" picks uvloop when installed: the plain asyncio loop in a non-main thread adds
        # ~44 ms to every request here, which made every HTTP test crawl.
        server = uvicorn.Server(uvicorn_config(SandboxApp(self.config), loop="auto"))
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="certyo-sandbox", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                thread.join(5)
                sock.close()
                raise RuntimeError("certyo-sandbox did not start; see the log above")
            time.sleep(0.01)
        self._server, self._thread, self._socket = server, thread, sock
        return self

    def stop(self) -> None:
        if self._thread is None or self._server is None:
            return
        self._server.should_exit = True
        self._thread.join(10)
        self._socket.close()
        self._session.close()
        self._session = requests.Session()
        self._server = self._thread = None

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SandboxServer(base_url={self.base_url!r}, config={self.config!r})"


def _drain(stream: Any) -> None:
    with contextlib.suppress(ValueError, OSError):
        for _ in stream:
            pass


def config_to_args(config: SandboxConfig, *, port: int = 0) -> list[str]:
    """CLI arguments equivalent to `config` (API keys excluded: they go by environment)."""
    args = [
        "--host", "127.0.0.1",
        "--port", str(port),
        "--db", config.db_path,
        "--flush-records", str(config.flush_records),
        "--flush-seconds", str(config.flush_seconds),
        "--anchor-delay-seconds", str(config.anchor_delay_seconds),
        "--max-body-bytes", str(config.max_body_bytes),
    ]  # fmt: skip
    if config.rate_limit_rps is not None:
        args += ["--rate-limit-rps", str(config.rate_limit_rps)]
    if config.enable_fault_injection:
        args.append("--enable-fault-injection")
    if config.chain_rpc is not None:
        args += ["--chain-rpc", config.chain_rpc]
    return args


class SandboxProcess(_SandboxControls):
    """`python -m certyo_sandbox.cli` as a child process; a context manager.

    Give either a `SandboxConfig` (its API keys travel in the environment, not on the
    command line, so `ps` never shows them) or raw CLI arguments such as
    `["--flush-records", "10"]` (defaults: a free port and an in-memory database).
    Leaving the block kills the process.
    """

    def __init__(
        self,
        config: SandboxConfig | Sequence[str] | None = None,
        *,
        extra_args: Sequence[str] = (),
    ) -> None:
        if config is None or isinstance(config, SandboxConfig):
            self.config: SandboxConfig | None = config or SandboxConfig()
            self._cli_args: list[str] | None = None
        else:
            self.config, self._cli_args = None, list(config)
        self.extra_args = list(extra_args)
        self.port = 0
        self._process: subprocess.Popen[str] | None = None
        self._session = requests.Session()

    def start(self) -> SandboxProcess:
        env = dict(os.environ)
        args = [sys.executable, "-m", "certyo_sandbox.cli"]
        if self.config is not None:
            env[API_KEYS_ENV] = ",".join(f"{k}={t}" for k, t in self.config.api_keys.items())
            args += config_to_args(self.config, port=self.port)
        else:
            # Later options win in argparse, so the caller's arguments override these.
            args += ["--port", str(self.port), "--db", ":memory:", *(self._cli_args or [])]
        args += ["--announce-port", *self.extra_args]
        self._process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True)
        try:
            self.port = self._read_announced_port()
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _read_announced_port(self) -> int:
        assert self._process is not None and self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.startswith("certyo-sandbox port "):
            raise RuntimeError(f"certyo-sandbox failed to start (said {line.strip()!r})")
        # Keep reading stdout (e.g. an access log) so a full pipe never blocks the child.
        threading.Thread(
            target=_drain, args=(self._process.stdout,), name="certyo-sandbox-stdout", daemon=True
        ).start()
        return int(line.split()[-1])

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"certyo-sandbox exited with {self._process.returncode}")
            with contextlib.suppress(requests.RequestException):
                if self._session.get(self.base_url + "/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError("certyo-sandbox did not become healthy in time")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if process.stdout is not None:
            process.stdout.close()
        self._session.close()
        self._session = requests.Session()

    def __enter__(self) -> SandboxProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SandboxProcess(base_url={self.base_url!r}, config={self.config!r})"
