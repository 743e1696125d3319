"""How many records per second certyo-sandbox accepts in 1000-record bulk calls.

The sandbox runs as a subprocess (`SandboxProcess`) so the client threads here never share
its GIL. Bodies are encoded before the clock starts, so the figure is the server's cost.
The same run first measures one connection, then several, and prints both with the ratio.

    .venv/bin/python benchmarks/sandbox_throughput.py --seconds 10 --connections 4
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from typing import Any

import orjson
import requests
from _common import process_cpu_seconds

from certyo_sandbox.config import DEFAULT_API_KEY, DEFAULT_TENANT, SandboxConfig
from certyo_sandbox.server import SandboxProcess

BULK_SIZE = 1000


def product_payload(rng: random.Random, n: int) -> dict[str, Any]:
    """A ~1 KB sanitised product document: nested sub-documents, string prices, dates."""
    return {
        "_id": f"{rng.getrandbits(96):024x}",
        "sku": f"SKU-{n:08d}",
        "name": f"Product {n} {rng.choice(['Deluxe', 'Basic', 'Pro', 'Café Édition'])}",
        "category": {"id": rng.randint(1, 500), "path": ["home", "kitchen", "small-appliances"]},
        "price": {"amount": f"{rng.randint(100, 99999) / 100:.2f}", "currency": "EUR"},
        "stock": rng.randint(0, 10_000),
        "active": rng.random() > 0.1,
        "tags": rng.sample(["new", "sale", "eco", "bestseller", "limited", "gift"], 3),
        "variants": [
            {
                "sku": f"SKU-{n:08d}-{v}",
                "color": rng.choice(["red", "blue", "black", "white"]),
                "size": rng.choice(["S", "M", "L", "XL"]),
                "price": f"{rng.randint(100, 99999) / 100:.2f}",
                "barcode": f"{rng.getrandbits(40):013d}",
            }
            for v in range(3)
        ],
        "supplier": {
            "name": "ACME Distribution GmbH",
            "contact": {"email": "orders@acme.example", "phone": "+49 30 1234567"},
            "address": {"street": "Hauptstraße 1", "city": "Berlin", "zip": "10115"},
        },
        "createdAt": "2025-01-14T10:30:00.000Z",
        "updatedAt": f"2026-04-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:15:42.123Z",
        "description": "A dependable product. " * 4,
    }


def bulk_bodies(count: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    bodies = []
    for b in range(count):
        records = []
        for i in range(BULK_SIZE):
            n = b * BULK_SIZE + i
            records.append(
                {
                    "tenantId": DEFAULT_TENANT,
                    "database": "productdb",
                    "collection": "products",
                    "recordId": f"p{n}",
                    "recordVersion": "1",
                    "operationType": "upsert",
                    "sourceTimestamp": "2026-04-14T10:30:00.000+00:00",
                    "idempotencyKey": f"productdb.products.p{n}.{seed}",
                    "recordPayload": product_payload(rng, n),
                }
            )
        bodies.append(orjson.dumps({"tenantId": DEFAULT_TENANT, "records": records}))
    return bodies


def run(base_url: str, bodies: list[bytes], connections: int, seconds: float) -> tuple[float, int]:
    """(records/s, records accepted) with `connections` threads posting distinct bodies."""
    stop_at = time.perf_counter() + seconds
    accepted = [0] * connections
    errors: list[str] = []
    cursor = iter(range(len(bodies)))
    lock = threading.Lock()

    def worker(slot: int) -> None:
        session = requests.Session()
        headers = {"X-API-Key": DEFAULT_API_KEY, "Content-Type": "application/json"}
        while time.perf_counter() < stop_at:
            with lock:
                index = next(cursor, None)
            if index is None:
                return
            response = session.post(
                base_url + "/api/v1/records/bulk", data=bodies[index], headers=headers, timeout=60
            )
            if response.status_code != 202:
                errors.append(f"{response.status_code}: {response.text[:200]}")
                return
            accepted[slot] += response.json()["accepted"]

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise SystemExit(f"bulk call failed: {errors[0]}")
    return sum(accepted) / elapsed, sum(accepted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each run")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--bodies", type=int, default=400, help="distinct bulk bodies to send")
    parser.add_argument("--db", default=":memory:", help="sandbox database (file or :memory:)")
    args = parser.parse_args()

    bodies = bulk_bodies(args.bodies)
    size = sum(len(b) for b in bodies) / len(bodies) / BULK_SIZE
    print(f"{len(bodies)} bodies of {BULK_SIZE} records, {size:.0f} bytes per record")
    half = len(bodies) // 2
    with SandboxProcess(SandboxConfig(db_path=args.db)) as sandbox:
        pid = sandbox.pid or 0
        cpu_start = process_cpu_seconds(pid)
        single, single_n = run(sandbox.base_url, bodies[:half], 1, args.seconds / 2)
        cpu_mid = process_cpu_seconds(pid)
        multi, multi_n = run(sandbox.base_url, bodies[half:], args.connections, args.seconds)
        cpu_end = process_cpu_seconds(pid)
    print(f"1 connection:  {single:,.0f} records/s")
    print(f"{args.connections} connections: {multi:,.0f} records/s ({multi / single:.2f}x of 1)")
    # Wall-clock rates on a shared 2-core box include the client's own CPU use; records per
    # server CPU-second is the sandbox's capacity when it has a core to itself.
    per_cpu = (single_n + multi_n) / (cpu_end - cpu_start)
    print(f"server capacity: {per_cpu:,.0f} records per server CPU-second")
    print(
        f"  (1 connection: {single_n / (cpu_mid - cpu_start):,.0f}, "
        f"{args.connections} connections: {multi_n / (cpu_end - cpu_mid):,.0f})"
    )


if __name__ == "__main__":
    main()
