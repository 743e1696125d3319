"""`certyo-proof`: export proof bundles, and verify them offline.

    certyo-proof export --collection products --id 665a1b2c3d4e5f6a7b8c9d0e [--version N]
    certyo-proof export --collection products --since 2026-11-30T00:00Z --out bundles/
    certyo-proof verify bundles/*.proof.json [--rpc URL] [--json]

`verify` needs nothing but the bundles (and, with --rpc, a node of the chain); it loads
only `certyo_dagster.prove`. `export` reads MongoDB and Certyo with the pipeline's own
settings: MONGO_URI, MONGO_DATABASE, CERTYO_COLLECTIONS, CERTYO_BASE_URL, CERTYO_API_KEY,
CERTYO_TENANT_ID. Exit status: 0 all verified or written, 1 something rejected or not
written, 2 bad usage or configuration, 3 (verify) nothing rejected but the chain could not
be asked about some bundle.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from certyo_dagster.prove.bundle import SUFFIX

EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_USAGE = 2
EXIT_UNCHECKED = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="certyo-proof",
        description="Export self-contained proof bundles of anchored document versions, and "
        "verify them with no MongoDB and no Certyo (docs/proof-bundle.md).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser(
        "export",
        help="write bundles (reads MONGO_URI, MONGO_DATABASE, CERTYO_* like the pipeline)",
    )
    export.add_argument("--collection", required=True, help="the watched collection")
    which = export.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", help="the document's _id (string, ObjectId hex or integer)")
    which.add_argument(
        "--since",
        help="every document anchored at or after this ISO 8601 time (UTC unless it says)",
    )
    export.add_argument(
        "--version",
        type=int,
        help="with --id: the version (recordVersion, epoch ms); default the anchored one",
    )
    export.add_argument(
        "--out",
        help="with --id: a file or folder (default: the current folder); with --since: "
        "the folder, required",
    )

    verify = commands.add_parser("verify", help="check bundles offline")
    verify.add_argument("bundles", nargs="+", help=f"bundle files, or folders of *{SUFFIX}")
    verify.add_argument(
        "--rpc",
        metavar="URL",
        help="a JSON-RPC node of the anchoring chain: also check that the transaction exists, "
        "succeeded, is in the stated block and carries the root",
    )
    verify.add_argument("--json", action="store_true", help="one JSON object per bundle")
    verify.add_argument(
        "--timeout", type=float, default=10.0, help="seconds per RPC call (default 10)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "verify":
        return run_verify(args.bundles, rpc_url=args.rpc, as_json=args.json, timeout=args.timeout)
    if args.id is None and args.out is None:
        parser.error("export --since needs --out DIR")
    if args.version is not None and args.id is None:
        parser.error("--version goes with --id")
    return run_export(args, os.environ)


# -- verify ------------------------------------------------------------------------------------


def bundle_paths(names: Sequence[str]) -> list[str]:
    paths: list[str] = []
    for name in names:
        if os.path.isdir(name):
            paths.extend(sorted(str(p) for p in Path(name).glob(f"*{SUFFIX}")))
        else:
            paths.append(name)
    return paths


def run_verify(
    names: Sequence[str],
    *,
    rpc_url: str | None = None,
    as_json: bool = False,
    timeout: float = 10.0,
    out: TextIO | None = None,
) -> int:
    from certyo_dagster.prove.chain import EvmRpc
    from certyo_dagster.prove.verifier import REJECTED, UNCHECKED, verify_bundle_file

    out = out or sys.stdout
    paths = bundle_paths(names)
    if not paths:
        print("certyo-proof verify: no bundles found", file=sys.stderr)
        return EXIT_USAGE
    try:
        rpc = EvmRpc(rpc_url, timeout=timeout) if rpc_url else None
    except ValueError as exc:
        print(f"certyo-proof verify: {exc}", file=sys.stderr)
        return EXIT_USAGE
    verdicts = []
    try:
        for path in paths:
            verdict = verify_bundle_file(path, rpc)
            verdicts.append(verdict)
            print(json.dumps(verdict.as_json()) if as_json else verdict.line(), file=out)
    finally:
        if rpc is not None:
            rpc.close()
    if any(v.verdict == REJECTED for v in verdicts):
        return EXIT_REJECTED
    if any(v.verdict == UNCHECKED for v in verdicts):
        return EXIT_UNCHECKED
    return EXIT_OK


# -- export ------------------------------------------------------------------------------------


def parse_since(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"--since {text!r} is not an ISO 8601 time such as 2026-11-30T00:00Z"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def run_export(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    # The pipeline (pymongo, the Certyo client) is loaded only here, never for verify.
    from certyo_dagster.settings import CollectionSpec, ConfigError, PipelineSettings
    from certyo_dagster.ship.client import CertyoClient
    from certyo_dagster.ship.errors import CertyoError
    from certyo_dagster.ship.resource import insecure_http_from_env
    from certyo_dagster.source.mongo import open_client, open_database, redact_uri
    from certyo_dagster.verify.export import BundleExporter, ExportError

    def fail(message: str, status: int = EXIT_USAGE) -> int:
        print(f"certyo-proof export: {message}", file=sys.stderr)
        return status

    uri = env.get("MONGO_URI", "").strip()
    api_key = env.get("CERTYO_API_KEY", "").strip()
    if not uri:
        return fail("MONGO_URI is not set")
    if not api_key:
        return fail("CERTYO_API_KEY is not set")
    for name in ("CERTYO_BASE_URL", "CERTYO_TENANT_ID"):
        if not env.get(name, "").strip():
            return fail(f"{name} is not set")
    try:
        settings = PipelineSettings.from_env(env)
        since = parse_since(args.since) if args.since is not None else None
        database = settings.collections[0].database
        spec = next(
            (s for s in settings.collections if s.collection == args.collection),
            None,
        ) or CollectionSpec(database, args.collection)
        client = CertyoClient(
            env["CERTYO_BASE_URL"].strip(),
            api_key,
            env["CERTYO_TENANT_ID"].strip(),
            allow_insecure_http=insecure_http_from_env(),
        )
    except (ConfigError, ValueError) as exc:
        return fail(str(exc).replace(api_key, "***"))

    def scrub(text: str) -> str:
        return text.replace(uri, redact_uri(uri)).replace(api_key, "***")

    from pymongo.errors import PyMongoError

    collection = open_database(open_client(uri), spec.database)[spec.collection]
    exporter = BundleExporter(collection, spec, client)
    try:
        if args.id is not None:
            target = Path(args.out) if args.out else Path.cwd()
            bundle = exporter.bundle_for(exporter.find_document(args.id), args.version)
            print(exporter.write(bundle, target))
            return EXIT_OK
        assert since is not None
        report = exporter.export_anchored_since(since, Path(args.out))
    except ExportError as exc:
        return fail(scrub(str(exc)), EXIT_REJECTED)
    except (CertyoError, PyMongoError, OSError) as exc:
        return fail(scrub(f"{type(exc).__name__}: {exc}"), EXIT_REJECTED)
    finally:
        client.close()
    print(
        f"{report.written} bundles written to {report.folder}"
        + (f", {report.skipped} versions skipped" if report.skipped else "")
    )
    for problem in report.problems:
        print(f"  skipped: {scrub(problem)}", file=sys.stderr)
    return EXIT_REJECTED if report.skipped else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
