"""`certyo-sandbox`: run a local Certyo API for development, tests and benchmarks."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import sys

import uvicorn

from certyo_sandbox.app import SandboxApp
from certyo_sandbox.config import (
    DEFAULT_API_KEY,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_TENANT,
    SandboxConfig,
)
from certyo_sandbox.server import API_KEYS_ENV, bind_socket, uvicorn_config

DEFAULT_DB = "certyo-sandbox.db"


def parse_api_key(text: str) -> tuple[str, str]:
    key, sep, tenant = text.partition("=")
    if not sep or not key.strip() or not tenant.strip():
        # Never echo the value: it is a secret.
        raise argparse.ArgumentTypeError("--api-key must look like KEY=TENANT")
    return key.strip(), tenant.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="certyo-sandbox",
        description=(
            "A local Certyo API: ingest, bulk ingest, verify and query, with RFC 9162 Merkle "
            "anchoring and optional fault injection. Without --api-key (and without "
            f"{API_KEYS_ENV}) it accepts the development key {DEFAULT_API_KEY!r} for "
            f"tenant {DEFAULT_TENANT!r}."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port; 0 picks a free one")
    parser.add_argument(
        "--db",
        default=DEFAULT_DB,
        help=f"SQLite file that keeps records across restarts (default ./{DEFAULT_DB}), "
        "or :memory: for a throwaway database",
    )
    parser.add_argument(
        "--api-key",
        action="append",
        type=parse_api_key,
        metavar="KEY=TENANT",
        help="an accepted API key and its tenant; repeatable. Also read from "
        f"{API_KEYS_ENV}=KEY=TENANT,KEY=TENANT, which keeps keys off the command line",
    )
    parser.add_argument("--flush-records", type=int, default=1000, help="batch size (1000)")
    parser.add_argument(
        "--flush-seconds", type=float, default=60.0, help="max age of a pending record (60)"
    )
    parser.add_argument(
        "--anchor-delay-seconds",
        type=float,
        default=0.0,
        help="time from batch flush to 'anchored on chain' (0)",
    )
    parser.add_argument(
        "--rate-limit-rps", type=float, default=None, help="per-API-key requests per second"
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"largest request body ({DEFAULT_MAX_BODY_BYTES})",
    )
    parser.add_argument(
        "--enable-fault-injection",
        action="store_true",
        help="serve /_sandbox/faults and /_sandbox/flush (tests only)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="refuse what the Certyo reference allows but a careful client avoids (a "
        "sourceTimestamp without a UTC offset, unknown or empty fields); by default such "
        "requests are accepted with a warning in this log",
    )
    parser.add_argument(
        "--chain-rpc",
        metavar="URL",
        default=None,
        help="anchor each batch root on this EVM chain (JSON-RPC, an unlocked account "
        "such as a local ganache's): verify then reports that transaction's hash, block and "
        "chain id. Without it, transaction hashes are simulated",
    )
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument(
        "--announce-port",
        action="store_true",
        help="print 'certyo-sandbox port N' on stdout once listening (for --port 0)",
    )
    return parser


def api_keys_from(args: argparse.Namespace, environ: dict[str, str]) -> dict[str, str]:
    pairs = list(args.api_key or [])
    for item in filter(None, (p.strip() for p in environ.get(API_KEYS_ENV, "").split(","))):
        pairs.append(parse_api_key(item))
    return dict(pairs) or {DEFAULT_API_KEY: DEFAULT_TENANT}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        api_keys = api_keys_from(args, dict(os.environ))
        config = SandboxConfig(
            api_keys=api_keys,
            db_path=args.db,
            flush_records=args.flush_records,
            flush_seconds=args.flush_seconds,
            anchor_delay_seconds=args.anchor_delay_seconds,
            rate_limit_rps=args.rate_limit_rps,
            enable_fault_injection=args.enable_fault_injection,
            max_body_bytes=args.max_body_bytes,
            strict=args.strict,
            chain_rpc=args.chain_rpc,
        )
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(str(exc))
    sock = bind_socket(args.host, args.port)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(SandboxApp(config), access_log=args.access_log))
    logging.getLogger("certyo_sandbox").info(
        "listening on http://%s:%d (%d API keys)", args.host, port, len(api_keys)
    )
    if args.announce_port:
        print(f"certyo-sandbox port {port}", flush=True)
    # A bulk body parses into ~50,000 short-lived acyclic objects, which refcounting frees;
    # the default GC thresholds would run ~50 pointless collections per call (~25% of CPU).
    gc.freeze()
    gc.set_threshold(200_000, 50, 100)
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
