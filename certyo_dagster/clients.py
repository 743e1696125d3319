"""Clients shared by everything in one process.

Dagster builds resources for every run and every sensor tick. Creating a MongoClient or a
`requests.Session` each time would pay a handshake each time and throw away connection pools
(pitfall 6), so each resource keeps its clients here: one per key, closed together.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeVar


class Closable(Protocol):
    def close(self) -> None: ...


ClientT = TypeVar("ClientT", bound=Closable)


class ProcessClients(Generic[ClientT]):
    """A thread-safe, process-wide cache of clients keyed by their configuration."""

    def __init__(self) -> None:
        self._clients: dict[Hashable, ClientT] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, create: Callable[[], ClientT]) -> ClientT:
        """The client for `key`, created by `create()` on first use."""
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = create()
                self._clients[key] = client
            return client

    def close_all(self) -> None:
        """Close and forget every client (tests and process shutdown)."""
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()
