"""`LocalChain`: ganache on a free loopback port, its keys kept out of the terminal, and no
process left behind."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from certyo_demo.servers import LocalChain, ServerError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_starts_answers_and_stops_without_leaving_a_process(tmp_path, capfd):
    log = tmp_path / "ganache.log"
    with LocalChain(log_path=log) as chain:
        assert chain.url.startswith("http://127.0.0.1:")
        assert chain.answers()
        pid = chain.process.pid
    assert not _alive(pid)
    assert not chain.answers()
    # The banner lists the accounts' private keys: it goes to the log, not the terminal.
    assert "Private Keys" in log.read_text()
    out, err = capfd.readouterr()
    assert "Private Keys" not in out + err


def test_a_taken_port_is_a_clear_error(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        chain = LocalChain(port=port, log_path=tmp_path / "ganache.log")
        with pytest.raises(ServerError, match=f"port {port}"):
            chain.start(timeout=20)
        assert chain.process is None or chain.process.poll() is not None


def test_without_node_the_error_says_what_is_missing():
    with pytest.raises(ServerError, match="needs Node.js"):
        LocalChain(node="no-such-node-binary").start()
