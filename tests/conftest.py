"""Shared fixtures live in tests/fixtures/, one module per external system."""

pytest_plugins = [
    "fixtures.servers",
    "fixtures.mongo",
    "fixtures.sandbox",
    "fixtures.pipeline",
    "fixtures.ledger",
    "fixtures.tcp_proxy",
    "fixtures.chain",
    "fixtures.postgres",
    "fixtures.streams",
]
