"""RFC 9162 Merkle trees: published vectors, every proof of every small tree, and tampering."""

import hashlib

import pytest

from certyo_dagster.prove.hashing import record_hash, record_hash_bytes
from certyo_dagster.prove.merkle import (
    EMPTY_ROOT,
    inclusion_proof,
    merkle_root,
    proof_from_levels,
    root_from_inclusion_proof,
    tree_levels,
    verify_inclusion,
)

# transparency-dev/merkle (and RFC 6962's reference tests): leaves and roots for sizes 1..8.
VECTOR_LEAVES = [
    bytes.fromhex(h)
    for h in ["", "00", "10", "2021", "3031", "40414243", "5051525354555657",
              "606162636465666768696a6b6c6d6e6f"]
]  # fmt: skip
VECTOR_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
# Inclusion proofs for the 8-leaf tree (leaf 0 and leaf 5), from the same vectors.
VECTOR_PROOFS = {
    (0, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (5, 8): [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
}


def test_empty_tree_root_is_hash_of_nothing():
    assert merkle_root([]) == hashlib.sha256(b"").digest() == EMPTY_ROOT


@pytest.mark.parametrize("size", range(1, 9))
def test_roots_match_published_vectors(size):
    assert merkle_root(VECTOR_LEAVES[:size]).hex() == VECTOR_ROOTS[size - 1]


@pytest.mark.parametrize(("index", "size"), sorted(VECTOR_PROOFS))
def test_proofs_match_published_vectors(index, size):
    proof = inclusion_proof(index, VECTOR_LEAVES[:size])
    assert [p.hex() for p in proof] == VECTOR_PROOFS[(index, size)]


def test_every_leaf_of_every_tree_up_to_300_verifies():
    leaves = [record_hash_bytes(record_hash({"n": i})) for i in range(300)]
    for size in range(1, 301):
        levels = tree_levels(leaves[:size])
        root = levels[-1][0]
        for index in range(size):
            proof = proof_from_levels(index, levels)
            assert verify_inclusion(index, size, leaves[index], proof, root), (index, size)


def _flip(b: bytes, at: int = 0) -> bytes:
    return b[:at] + bytes([b[at] ^ 0x01]) + b[at + 1 :]


def test_flipped_byte_in_leaf_or_proof_or_root_is_rejected():
    leaves = VECTOR_LEAVES[:7] + [b"certyo"]
    root = merkle_root(leaves)
    proof = inclusion_proof(3, leaves)
    assert verify_inclusion(3, 8, leaves[3], proof, root)
    assert not verify_inclusion(3, 8, _flip(leaves[3]), proof, root)
    for i in range(len(proof)):
        tampered = list(proof)
        tampered[i] = _flip(tampered[i], 17)
        assert not verify_inclusion(3, 8, leaves[3], tampered, root)
    assert not verify_inclusion(3, 8, leaves[3], proof, _flip(root, 31))
    assert not verify_inclusion(4, 8, leaves[3], proof, root)


def test_index_at_or_beyond_tree_size_is_rejected():
    leaves = VECTOR_LEAVES[:4]
    root = merkle_root(leaves)
    proof = inclusion_proof(3, leaves)
    assert not verify_inclusion(4, 4, leaves[3], proof, root)
    assert not verify_inclusion(-1, 4, leaves[3], proof, root)
    with pytest.raises(ValueError, match="not below tree size"):
        root_from_inclusion_proof(4, 4, leaves[3], proof)


def test_over_long_and_short_paths_are_rejected():
    leaves = VECTOR_LEAVES[:5]
    root = merkle_root(leaves)
    proof = inclusion_proof(2, leaves)
    assert not verify_inclusion(2, 5, leaves[2], proof + [root], root)
    assert not verify_inclusion(2, 5, leaves[2], proof[:-1], root)
    with pytest.raises(ValueError, match="longer"):
        root_from_inclusion_proof(0, 1, leaves[0], [root])


def test_record_hash_is_sha256_of_rfc8785_bytes():
    payload = {"b": [1, 2.5, "é"], "a": {"z": None, "y": True}}
    canonical = '{"a":{"y":true,"z":null},"b":[1,2.5,"é"]}'.encode()
    assert record_hash(payload) == "sha256:" + hashlib.sha256(canonical).hexdigest()
    assert record_hash({"a": 1, "b": 2}) == record_hash({"b": 2, "a": 1})


def test_record_hash_bytes_rejects_malformed_hashes():
    with pytest.raises(ValueError, match="sha256"):
        record_hash_bytes("md5:abcd")
    with pytest.raises(ValueError, match="64 hex"):
        record_hash_bytes("sha256:abcd")
