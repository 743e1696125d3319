"""The local SecantusDB starter: it answers, keeps data across a crash, and leaves nothing."""

from __future__ import annotations

import os

import pymongo
import pytest

from certyo_demo.servers import SecantusServer, ServerError


def test_a_server_keeps_its_data_across_a_crash_and_leaves_no_process(secantus_factory):
    server = secantus_factory()
    client = pymongo.MongoClient(server.uri, serverSelectionTimeoutMS=10_000)
    client.shop.items.insert_one({"_id": 1, "name": "kettle"})
    pid = server.process.pid
    server.restart(crash=True)
    assert server.process.pid != pid
    assert client.shop.items.find_one({"_id": 1})["name"] == "kettle"
    client.close()
    server.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(server.process.pid, 0)


def test_a_server_that_cannot_start_says_why(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the storage folder should be")
    with pytest.raises(ServerError, match="cannot use .* as SecantusDB storage"):
        SecantusServer(blocker / "inside", log_path=tmp_path / "log").start(timeout=20)
