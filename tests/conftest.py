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
    "fixtures.kafka",
]


def pytest_collection_modifyitems(config, items):
    """Tests marked `debezium` run only when asked for: `pytest -m debezium`."""
    import pytest

    if "debezium" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="opt-in whole-chain test: run it with `pytest -m debezium`")
    for item in items:
        if item.get_closest_marker("debezium") is not None:
            item.add_marker(skip)
