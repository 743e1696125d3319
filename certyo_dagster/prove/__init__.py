"""What makes a version provable: the record hash and RFC 9162 Merkle proofs."""
