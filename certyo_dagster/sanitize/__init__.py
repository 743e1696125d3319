"""MongoDB documents as I-JSON, and the one mapping from a document version to a Certyo record."""
