"""`certyo-demo`: seed the demo catalog, keep it changing, or run the pipeline end to end."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from certyo_dagster.settings import DEFAULT_COLLECTIONS, DEFAULT_DATABASE
from certyo_dagster.source.mongo import open_client, redact_uri
from certyo_demo.store import churn, seed_catalog


class UsageError(RuntimeError):
    """What is missing to run a command, in one line."""


def _collection(args: argparse.Namespace) -> Any:
    uri = os.environ.get("MONGO_URI", "").strip()
    if not uri:
        raise UsageError(
            "MONGO_URI is not set: for the database `make run` started, "
            "`source .certyo_run/env.sh` first"
        )
    database = os.environ.get("MONGO_DATABASE", "").strip() or DEFAULT_DATABASE
    print(f"store: {redact_uri(uri)}, collection {database}.{args.collection}", flush=True)
    return open_client(uri)[database][args.collection]


def _seed(args: argparse.Namespace) -> int:
    result = seed_catalog(_collection(args), count=args.count, seed=args.seed, hours=args.hours)
    if result.already_seeded:
        print(f"already seeded ({result.existing} documents): nothing to do")
    else:
        print(f"seeded {result.inserted} products, updatedAt over the last {args.hours:g} hours")
    return 0


def _churn(args: argparse.Namespace) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stats = churn(
            _collection(args),
            interval=args.interval,
            changes=args.changes,
            max_iterations=args.max_iterations,
            seed=args.seed,
            stop=stop,
        )
    except KeyboardInterrupt:
        return 130
    print(
        f"churn stopped after {stats.ticks} ticks: {stats.edited} edited, {stats.inserted} "
        f"inserted, {stats.soft_deleted} soft-deleted, {stats.hard_deleted} hard-deleted"
    )
    return 0


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from exc
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="certyo-demo",
        description="Demo data for certyo_dagster. Uses MONGO_URI and MONGO_DATABASE; "
        "`source .certyo_run/env.sh` sets them to the database `make run` started.",
    )
    parser.add_argument(
        "--collection",
        default=DEFAULT_COLLECTIONS.split(",")[0],
        help="collection to write (default products)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    seed = sub.add_parser("seed", help="insert the demo catalog once (no-op if not empty)")
    seed.add_argument("--count", type=_positive(int), default=3000, help="products (3000)")
    seed.add_argument("--seed", type=int, default=42, help="random seed (42)")
    seed.add_argument(
        "--hours", type=_positive(float), default=4.0, help="spread updatedAt over (4) hours"
    )
    seed.set_defaults(run=_seed)

    ch = sub.add_parser("churn", help="keep editing, inserting and deleting a few products")
    ch.add_argument("--interval", type=_positive(float), default=5.0, help="seconds (5)")
    ch.add_argument("--changes", type=_positive(int), default=3, help="changes per tick (3)")
    ch.add_argument("--max-iterations", type=_positive(int), default=None, help="then stop")
    ch.add_argument("--seed", type=int, default=None, help="random seed (random)")
    ch.set_defaults(run=_churn)

    run = sub.add_parser("run", help="seed, materialize, anchor, verify and print a summary")
    run.add_argument("--hours", type=_positive(int), default=3, help="partitions to run (3)")
    run.add_argument(
        "--timeout", type=_positive(float), default=600, help="give up after (600) seconds"
    )
    run.add_argument(
        "--run-dir", default=None, help="where data and logs go (.certyo_run/make-demo)"
    )
    run.add_argument(
        "--instance-config",
        type=Path,
        default=Path("dagster.yaml"),
        help="Dagster instance config copied into DAGSTER_HOME (dagster.yaml)",
    )
    run.set_defaults(run=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    from certyo_demo.driver import run_demo

    return run_demo(
        hours=args.hours,
        timeout=args.timeout,
        run_dir=args.run_dir,
        instance_config=args.instance_config,
    )


def main(argv: Sequence[str] | None = None) -> int:
    from certyo_demo.launcher import LaunchError
    from certyo_demo.servers import ServerError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (UsageError, LaunchError, ServerError) as exc:
        print(f"certyo-demo: {exc}", file=sys.stderr, flush=True)
        return 1
