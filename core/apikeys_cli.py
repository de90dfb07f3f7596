"""``reasonq keys``: create, list and revoke API keys.

    reasonq keys create --name team-a [--rate-limit 5/s] [--max-concurrent-jobs 100]
    reasonq keys list
    reasonq keys revoke KEY_ID

``create`` prints only the key on stdout (``KEY=$(reasonq keys create --name x)``); the
key is shown this once, Redis keeps its hash.
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import UTC, datetime

import redis

from core import apikeys
from core.settings import settings

_PER = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_rate(text: str) -> float:
    """'5/s', '300/m', '1000/h' or a bare number (per second) -> requests per second."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|m|min|h))?\s*", text)
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N/s, N/m or N/h with N > 0")
    return float(match[1]) / _PER[match[2] or "s"]


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reasonq keys", description="Manage API keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="Create a key and print it (once).")
    create.add_argument("--name", required=True, help="Who the key is for (team, service).")
    create.add_argument(
        "--rate-limit", type=parse_rate, metavar="N/s",
        help="Job submissions allowed, e.g. 5/s, 300/m or 1000/h.",
    )
    create.add_argument(
        "--max-concurrent-jobs", type=positive_int, metavar="N",
        help="Queued + running jobs allowed.",
    )
    commands.add_parser("list", help="List keys with their limits and active jobs.")
    revoke = commands.add_parser("revoke", help="Revoke a key; it is refused at once.")
    revoke.add_argument("key_id")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    client = redis.Redis.from_url(settings.redis_url)
    if args.command == "create":
        key, token = apikeys.create(client, args.name, args.rate_limit, args.max_concurrent_jobs)
        print(token)
        print(f"created key {key.id} ({key.name}); it is shown only this once", file=sys.stderr)
        return 0
    if args.command == "list":
        rows = [("ID", "NAME", "CREATED", "RATE/S", "MAX JOBS", "ACTIVE", "STATUS")]
        for key, active in apikeys.list_keys(client):
            created = datetime.fromtimestamp(key.created_at, UTC).strftime("%Y-%m-%d %H:%M")
            rows.append((
                key.id, key.name, created,
                "-" if key.rate_limit_per_s is None else f"{key.rate_limit_per_s:g}",
                "-" if key.max_concurrent_jobs is None else str(key.max_concurrent_jobs),
                str(active), "revoked" if key.revoked else "active",
            ))  # fmt: skip
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        return 0
    if not apikeys.revoke(client, args.key_id):
        print(f"no key {args.key_id!r}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}")
    return 0
