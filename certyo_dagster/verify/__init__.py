"""Checking what Certyo anchored: verification write-back, the anchoring report, tamper audit."""
