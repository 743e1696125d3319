"""certyo-sandbox: a local stand-in for the Certyo API that tests and benchmarks run against.

It speaks the same HTTP contract as Certyo (ingest, bulk ingest, verify, query), hashes
records with the project's own RFC 8785 record hash, anchors batches in RFC 9162 Merkle
trees with deterministic fake IPFS ids and Polygon transactions, and can inject faults.
"""

from certyo_sandbox.config import (
    DEFAULT_API_KEY,
    DEFAULT_TENANT,
    SandboxConfig,
)

__all__ = ["DEFAULT_API_KEY", "DEFAULT_TENANT", "SandboxConfig"]
