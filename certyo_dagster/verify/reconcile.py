"""Reconcile one hour: do the versions we hold as accepted match what Certyo holds?

We hold a version as accepted when its document is `pending` or `anchored` with that
`certyo_version` and `certyo_record_hash`. MongoDB keeps only each document's latest
version, so it is compared with each record's latest version at Certyo (older versions at
Certyo are history, not a difference). For the hour, every version we hold must be Certyo's
latest for that recordId with the same record hash, and every record whose latest Certyo
version falls in the hour must be held by us at that version. Records Certyo has but we do
not hold as accepted at all (deleted documents, versions dead-lettered since) are counted,
not failed: polling never sees deletes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from certyo_dagster.sanitize.records import record_id_of
from certyo_dagster.verify.pending import ANCHORED, PENDING

ACCEPTED_STATUSES = (PENDING, ANCHORED)
DEFAULT_MAX_LISTED = 20

Version = tuple[int, str]  # (recordVersion in epoch ms, record hash)


@dataclass
class HourComparison:
    ours: int = 0
    certyo: int = 0
    matched: int = 0
    missing_at_certyo: int = 0
    version_differs: int = 0
    hash_differs: int = 0
    not_held: int = 0
    differing_ids: list[str] = field(default_factory=list)

    @property
    def mismatches(self) -> int:
        return self.missing_at_certyo + self.version_differs + self.hash_differs

    @property
    def passed(self) -> bool:
        return self.mismatches == 0 and self.ours == self.certyo


def compare_hour(
    held: Mapping[str, Version],
    certyo_latest: Mapping[str, Version],
    start_ms: int,
    end_ms: int,
    *,
    max_listed: int = DEFAULT_MAX_LISTED,
) -> HourComparison:
    """Compare the hour [start_ms, end_ms); `differing_ids` are the first ids in order."""
    result = HourComparison()
    differing: set[str] = set()
    for record_id, ours in held.items():
        if not start_ms <= ours[0] < end_ms:
            continue
        result.ours += 1
        theirs = certyo_latest.get(record_id)
        if theirs == ours:
            result.matched += 1
            continue
        differing.add(record_id)
        if theirs is None:
            result.missing_at_certyo += 1
        elif theirs[0] != ours[0]:
            result.version_differs += 1
        else:
            result.hash_differs += 1
    for record_id, theirs in certyo_latest.items():
        if not start_ms <= theirs[0] < end_ms:
            continue
        ours = held.get(record_id)
        if ours is None:
            result.not_held += 1
            continue
        result.certyo += 1
        if ours != theirs and not start_ms <= ours[0] < end_ms:
            differing.add(record_id)  # Certyo's latest is in this hour, ours is not
            result.version_differs += 1
    result.differing_ids = sorted(differing)[:max_listed]
    return result


def held_versions(collection: Any) -> dict[str, Version]:
    """recordId → (certyo_version, certyo_record_hash) of every document held as accepted."""
    held: dict[str, Version] = {}
    cursor = collection.find(
        {"certyo_status": {"$in": list(ACCEPTED_STATUSES)}},
        {"certyo_version": 1, "certyo_record_hash": 1},
    )
    for doc in cursor:
        version, digest = doc.get("certyo_version"), doc.get("certyo_record_hash")
        if isinstance(version, int) and isinstance(digest, str):
            held[record_id_of(doc["_id"])] = (version, digest)
    return held


def latest_versions(records: Iterable[Mapping[str, Any]]) -> dict[str, Version]:
    """recordId → Certyo's latest (recordVersion, recordHash), from query API records."""
    latest: dict[str, Version] = {}
    for record in records:
        try:
            version = int(str(record["recordVersion"]))
            entry = (version, str(record["recordHash"]))
            record_id = str(record["recordId"])
        except (KeyError, TypeError, ValueError):
            continue  # not a version the pipeline sent (no numeric recordVersion)
        known = latest.get(record_id)
        if known is None or version >= known[0]:
            latest[record_id] = entry
    return latest
