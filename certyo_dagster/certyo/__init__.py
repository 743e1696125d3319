"""Everything that speaks Certyo: the HTTP client, the record hash and the Merkle proofs."""
