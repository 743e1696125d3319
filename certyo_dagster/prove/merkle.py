"""Merkle tree hashing and inclusion proofs as specified by RFC 9162 section 2.1.

Leaves are arbitrary byte strings; for Certyo a leaf is the raw 32-byte digest of a record's
`recordHash`. Trees of any size are built without duplicating nodes: the left subtree holds
the largest power of two strictly below n.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"").digest()


class InvalidProofError(ValueError):
    """An inclusion proof that is malformed or does not lead to the expected root."""


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def tree_levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """All levels of the tree, leaf hashes first, root last.

    Adjacent nodes are paired level by level and an unpaired last node is carried up
    unchanged. Because RFC 9162 always splits at the largest power of two below n, this gives
    exactly the recursive MTH, and lets a whole batch's proofs be read off in O(n log n).
    """
    if not leaves:
        raise ValueError("a Merkle tree needs at least one leaf")
    level = [leaf_hash(leaf) for leaf in leaves]
    levels = [level]
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        levels.append(nxt)
        level = nxt
    return levels


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) of RFC 9162 2.1.1."""
    if not leaves:
        return EMPTY_ROOT
    return tree_levels(leaves)[-1][0]


def proof_from_levels(index: int, levels: Sequence[Sequence[bytes]]) -> list[bytes]:
    """PATH(m, D[n]) of RFC 9162 2.1.3.1 for a tree built by `tree_levels`."""
    n = len(levels[0])
    if not 0 <= index < n:
        raise IndexError(f"leaf index {index} outside a tree of size {n}")
    path = []
    for level in levels[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            path.append(level[sibling])
        index >>= 1
    return path


def inclusion_proof(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n]) of RFC 9162 2.1.3.1, from the leaf's sibling up to the root."""
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf index {index} outside a tree of size {len(leaves)}")
    return proof_from_levels(index, tree_levels(leaves))


def root_from_inclusion_proof(
    leaf_index: int, tree_size: int, leaf: bytes, audit_path: Sequence[bytes]
) -> bytes:
    """Recompute the root from a proof, per RFC 9162 2.1.3.2. Raises InvalidProofError."""
    if tree_size <= 0:
        raise InvalidProofError(f"tree size must be positive, got {tree_size}")
    if not 0 <= leaf_index < tree_size:
        raise InvalidProofError(f"leaf index {leaf_index} is not below tree size {tree_size}")
    fn, sn = leaf_index, tree_size - 1
    r = leaf_hash(leaf)
    for p in audit_path:
        if len(p) != 32:
            raise InvalidProofError("audit path entries must be 32 bytes")
        if sn == 0:
            raise InvalidProofError("audit path is longer than the tree allows")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InvalidProofError("audit path is shorter than the tree requires")
    return r


def verify_inclusion(
    leaf_index: int, tree_size: int, leaf: bytes, audit_path: Sequence[bytes], root: bytes
) -> bool:
    """True when the proof shows `leaf` at `leaf_index` in the tree with `root`."""
    try:
        computed = root_from_inclusion_proof(leaf_index, tree_size, leaf, audit_path)
    except InvalidProofError:
        return False
    return computed == root
