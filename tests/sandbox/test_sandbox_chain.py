"""`--chain-rpc`: the sandbox anchors each batch root in a real transaction on a local chain."""

from __future__ import annotations

import pytest
from fixtures.chain import rpc
from fixtures.sandbox import TENANT_A, post_json, sample_record, sandbox_test_config

from certyo_dagster.prove.chain import EvmRpc, check_anchor
from certyo_demo.servers import LocalChain, free_port
from certyo_sandbox.cli import build_parser
from certyo_sandbox.server import SandboxServer, config_to_args


def _verify(server: SandboxServer, record_id: str) -> dict:
    body = {
        "tenantId": TENANT_A,
        "database": "productdb",
        "collection": "products",
        "recordId": record_id,
    }
    response = post_json(server, "/api/v1/verify/record", body)
    assert response.status_code == 200, response.text
    return response.json()


def test_each_batch_root_is_the_calldata_of_a_mined_transaction(chain_sandbox, local_chain):
    for i in range(3):
        response = post_json(chain_sandbox, "/api/v1/records", sample_record(f"r{i}"))
        assert response.status_code == 202
    chain_sandbox.flush()
    answers = [_verify(chain_sandbox, f"r{i}") for i in range(3)]
    assert {a["transactionHash"] for a in answers} == {answers[0]["transactionHash"]}
    answer = answers[0]
    assert answer["anchoredOnChain"] is True and answer["status"] == "anchored"
    assert answer["chainId"] == 1337
    tx = rpc(local_chain.url, "eth_getTransactionByHash", answer["transactionHash"])
    receipt = rpc(local_chain.url, "eth_getTransactionReceipt", answer["transactionHash"])
    assert tx["input"] == "0x" + answer["merkleRoot"]
    assert receipt["status"] == "0x1"
    assert int(receipt["blockNumber"], 16) == answer["blockNumber"]
    with EvmRpc(local_chain.url) as node:
        held = check_anchor(
            node,
            root=bytes.fromhex(answer["merkleRoot"]),
            transaction_hash=answer["transactionHash"],
            block_number=answer["blockNumber"],
            chain_id=1337,
        )
    assert held.holds, held.problem


def test_an_unreachable_chain_leaves_batches_unanchored_until_it_answers(sandbox_factory):
    dead_url = f"http://127.0.0.1:{free_port()}"
    server = sandbox_factory(chain_rpc=dead_url)
    assert post_json(server, "/api/v1/records", sample_record("r1")).status_code == 202
    server.flush()
    answer = _verify(server, "r1")
    assert answer["anchoredOnChain"] is False
    assert answer["status"] == "batched" and answer["transactionHash"] is None
    stats = server.stats()
    assert stats["batches_off_chain"] == 1 and stats["chain_failures"] >= 1


def test_without_the_flag_transactions_stay_simulated(sandbox):
    assert post_json(sandbox, "/api/v1/records", sample_record("r1")).status_code == 202
    sandbox.flush()
    answer = _verify(sandbox, "r1")
    assert answer["anchoredOnChain"] is True
    assert "chainId" not in answer
    assert "chain_rpc" not in sandbox.stats()


def test_the_cli_and_subprocess_arguments_carry_the_rpc_url():
    args = build_parser().parse_args(["--chain-rpc", "http://127.0.0.1:8545"])
    assert args.chain_rpc == "http://127.0.0.1:8545"
    config = sandbox_test_config(chain_rpc="http://127.0.0.1:8545")
    assert config_to_args(config)[-2:] == ["--chain-rpc", "http://127.0.0.1:8545"]


def test_batches_waiting_for_the_chain_are_anchored_once_it_answers(sandbox_factory, tmp_path):
    port = free_port()
    server = sandbox_factory(chain_rpc=f"http://127.0.0.1:{port}")
    assert post_json(server, "/api/v1/records", sample_record("late")).status_code == 202
    server.flush()
    assert _verify(server, "late")["anchoredOnChain"] is False
    with LocalChain(port=port, log_path=tmp_path / "ganache.log") as chain:
        server.flush()  # also sends what waits for the chain
        answer = _verify(server, "late")
        assert answer["anchoredOnChain"] is True
        tx = rpc(chain.url, "eth_getTransactionByHash", answer["transactionHash"])
        assert tx["input"] == "0x" + answer["merkleRoot"]
        assert server.stats()["chain_failures"] == 0


def test_a_chain_rpc_that_is_not_http_is_refused():
    with pytest.raises(ValueError, match="chain_rpc must be an http"):
        sandbox_test_config(chain_rpc="ws://127.0.0.1:8545")
