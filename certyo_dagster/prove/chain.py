"""Just enough Ethereum JSON-RPC to check that a Merkle root was anchored in a transaction.

An anchor is a transaction whose calldata (`input`) is exactly the 32-byte root. It holds
when the node knows the transaction, its receipt says it succeeded (status 1), it sits in
the stated block and the node's chain id is the stated one. Any EVM node that speaks the
standard `eth_*` methods will do; nothing here signs or sends transactions.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import requests

DEFAULT_TIMEOUT_SECONDS = 10.0


class ChainRpcError(RuntimeError):
    """The node could not be reached or answered with an error."""


class EvmRpc:
    """A JSON-RPC client for one node URL, on one pooled `requests.Session`."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"an RPC URL must start with http:// or https://, got {url!r}")
        self.url = url
        self.timeout = timeout
        self._session = requests.Session()
        self._ids = itertools.count(1)

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> EvmRpc:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def call(self, method: str, *params: Any, timeout: float | None = None) -> Any:
        body = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": list(params)}
        try:
            response = self._session.post(self.url, json=body, timeout=timeout or self.timeout)
            response.raise_for_status()
            answer = response.json()
        except (requests.RequestException, ValueError) as exc:
            raise ChainRpcError(f"{method} to {self.url} failed: {type(exc).__name__}") from exc
        if not isinstance(answer, dict):
            raise ChainRpcError(f"{method} to {self.url}: the answer is not a JSON-RPC object")
        if answer.get("error") is not None:
            error = answer["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise ChainRpcError(f"{method} to {self.url} answered an error: {message}")
        return answer.get("result")

    def chain_id(self, timeout: float | None = None) -> int:
        return _quantity(self.call("eth_chainId", timeout=timeout), "eth_chainId")

    def transaction(self, tx_hash: str) -> dict | None:
        return self.call("eth_getTransactionByHash", tx_hash)

    def receipt(self, tx_hash: str) -> dict | None:
        return self.call("eth_getTransactionReceipt", tx_hash)


def _quantity(value: Any, what: str) -> int:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise ChainRpcError(f"{what} is not a hex quantity: {value!r}")
    try:
        return int(value, 16)
    except ValueError as exc:
        raise ChainRpcError(f"{what} is not a hex quantity: {value!r}") from exc


@dataclass(frozen=True)
class AnchorCheck:
    """What the node said about an anchor: `problem` is None when it holds."""

    problem: str | None
    chain_id: int | None = None
    block_number: int | None = None

    @property
    def holds(self) -> bool:
        return self.problem is None


def check_anchor(
    rpc: EvmRpc,
    *,
    root: bytes,
    transaction_hash: str,
    block_number: int,
    chain_id: int | None,
) -> AnchorCheck:
    """Ask the node whether `transaction_hash` anchors `root` in `block_number`.

    Raises ChainRpcError when the node cannot answer; a wrong anchor is a `problem`.
    """
    node_chain = rpc.chain_id()
    if chain_id is not None and node_chain != chain_id:
        return AnchorCheck(
            f"the node is on chain {node_chain}, the bundle names chain {chain_id}", node_chain
        )
    tx = rpc.transaction(transaction_hash)
    if tx is None:
        return AnchorCheck(f"chain {node_chain} has no transaction {transaction_hash}", node_chain)
    calldata = str(tx.get("input") or tx.get("data") or "").lower()
    if calldata != "0x" + root.hex():
        shown = calldata if len(calldata) <= 70 else calldata[:70] + "…"
        return AnchorCheck(
            f"transaction {transaction_hash} carries {shown}, not the root {root.hex()}",
            node_chain,
        )
    receipt = rpc.receipt(transaction_hash)
    if receipt is None:
        return AnchorCheck(f"transaction {transaction_hash} is not mined yet", node_chain)
    status = receipt.get("status")
    if status is None or _quantity(status, "receipt status") != 1:
        return AnchorCheck(
            f"transaction {transaction_hash} reverted (receipt status {status})", node_chain
        )
    mined_in = _quantity(receipt.get("blockNumber"), "receipt blockNumber")
    if mined_in != block_number:
        return AnchorCheck(
            f"transaction {transaction_hash} is in block {mined_in}, the bundle says "
            f"block {block_number}",
            node_chain,
            mined_in,
        )
    return AnchorCheck(None, node_chain, mined_in)
