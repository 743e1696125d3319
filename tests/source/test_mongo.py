"""The MongoDB side's small pure helpers."""

import pytest

from certyo_dagster.source.mongo import redact_uri


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("mongodb://app:placeholder1@db:27017/?replicaSet=rs0", "mongodb://app:***@db:27017/?replicaSet=rs0"),
        ("mongodb+srv://u:p%40ss@c.example.net/?w=1", "mongodb+srv://u:***@c.example.net/?w=1"),
        # unescaped '/', '?', '#' or '@' in a pasted password defeat urlsplit
        ("mongodb://app:placeholder/x1@db:27017/", "mongodb://app:***@db:27017/"),
        ("mongodb://app:a?b#c@db/", "mongodb://app:***@db/"),
        ("mongodb://app:p@ss@db/", "mongodb://app:***@db/"),
        ("mongodb://db:27017/", "mongodb://db:27017/"),
    ],
)  # fmt: skip
def test_redact_uri_hides_every_password(uri, shown):
    assert redact_uri(uri) == shown
    secret = uri.split("://", 1)[1].rpartition("@")[0].partition(":")[2]
    if secret:
        assert secret not in redact_uri(uri)
