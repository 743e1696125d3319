"""Anchoring on a real EVM chain: each batch root becomes the calldata of one transaction.

Used with `certyo-sandbox --chain-rpc URL`. The node must hold an unlocked, funded account
that `eth_sendTransaction` can send from (a local development chain such as the one
`certyo_demo.servers.LocalChain` starts); the first of `eth_accounts` sends every anchor to
itself, with no value. Calls block, so the app runs them in a worker thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from certyo_dagster.prove.chain import ChainRpcError, EvmRpc

# 21000 intrinsic + 16 per non-zero calldata byte covers a 32-byte root with room to spare.
ANCHOR_GAS = 30_000
_RECEIPT_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class ChainAnchor:
    chain_id: int
    transaction_hash: str
    block_number: int


class ChainAnchorer:
    """Sends anchor transactions to one node and waits for their receipts."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.rpc = EvmRpc(url, timeout=timeout)
        self._sender: str | None = None
        self._chain_id: int | None = None

    @property
    def url(self) -> str:
        return self.rpc.url

    def close(self) -> None:
        self.rpc.close()

    def anchor(self, root: bytes) -> ChainAnchor:
        """Put `root` on chain; raises ChainRpcError when that did not succeed."""
        if len(root) != 32:
            raise ValueError("a Merkle root is 32 bytes")
        if self._sender is None:
            accounts = self.rpc.call("eth_accounts")
            if not accounts:
                raise ChainRpcError(f"the node at {self.url} has no unlocked account to send from")
            self._sender, self._chain_id = accounts[0], self.rpc.chain_id()
        tx_hash = self.rpc.call(
            "eth_sendTransaction",
            {
                "from": self._sender,
                "to": self._sender,
                "data": "0x" + root.hex(),
                "gas": hex(ANCHOR_GAS),
            },
        )
        receipt = self._wait_for_receipt(tx_hash)
        if int(receipt.get("status", "0x0"), 16) != 1:
            raise ChainRpcError(f"anchor transaction {tx_hash} reverted")
        assert self._chain_id is not None
        return ChainAnchor(self._chain_id, tx_hash.lower(), int(receipt["blockNumber"], 16))

    def _wait_for_receipt(self, tx_hash: str) -> dict:
        deadline = time.monotonic() + _RECEIPT_TIMEOUT_SECONDS
        while True:
            receipt = self.rpc.receipt(tx_hash)
            if receipt is not None:
                return receipt
            if time.monotonic() > deadline:
                raise ChainRpcError(f"anchor transaction {tx_hash} was not mined in time")
            time.sleep(0.1)
