"""``memstream keys create|list|revoke``: the API keys of the HTTP API (registered in streams/surface/cli/main.py).

The keys file (MEMSTREAM_API_KEYS_FILE, default <home>/api-keys.json) keeps hashes only: a new key is printed
once, by ``create``, and can never be shown again; ``list`` shows ids, tenants, roles and times.
"""

from __future__ import annotations

import argparse
from typing import Any

from infra.api_keys import KeyStore, Role, parse_role
from infra.settings import Settings
from streams.surface.api import dumps

EXIT_OK = 0


def add_keys_commands(sub: Any) -> None:
    keys = sub.add_parser(
        "keys",
        help="API keys of `memstream serve`: create, list, revoke",
        description="Each key is bound to one tenant and one role: read (search, get, context), write (also "
        "publish events), admin (also /metrics). Only sha256 hashes are stored, in MEMSTREAM_API_KEYS_FILE "
        "(default <MEMSTREAM_HOME>/api-keys.json); a running server sees changes without a restart.",
    )
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    p = actions.add_parser("create", help="make a key and print it (the only time it is shown)")
    p.add_argument("--tenant", required=True, help="the tenant every request with this key reads and writes")
    p.add_argument("--role", required=True, choices=[r.value for r in Role], help="what the key may do")
    p.add_argument("--json", action="store_true", help="print {id, key, tenant, role, created_at}")
    p = actions.add_parser("list", help="ids, tenants, roles and times of the keys (never the keys)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = actions.add_parser("revoke", help="end a key now (running servers refuse it from their next request)")
    p.add_argument("id", help="the key's id (see `memstream keys list`)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    store = KeyStore(settings.keys_path)
    if args.keys_command == "create":
        entry, key = store.create(args.tenant, parse_role(args.role))
        if args.json:
            print(dumps({**entry.public(), "key": key}))
        else:
            print(key)
            print(f"(id {entry.key_id}, tenant {entry.tenant}, role {entry.role.value}: shown once, store it now)")
        return EXIT_OK
    if args.keys_command == "list":
        keys = store.entries()
        if args.json:
            print(dumps([k.public() for k in keys]))
        elif not keys:
            print(f"no API keys in {settings.keys_path} (make one with `memstream keys create`)")
        else:
            print(f"{'id':10}{'tenant':24}{'role':8}{'created':22}revoked")
            for k in keys:
                print(f"{k.key_id:10}{k.tenant:24}{k.role.value:8}{k.created_at:22}{k.revoked_at or '-'}")
        return EXIT_OK
    entry = store.revoke(args.id)
    if args.json:
        print(dumps(entry.public()))
    else:
        print(f"revoked {entry.key_id} (tenant {entry.tenant}, role {entry.role.value}) at {entry.revoked_at}")
    return EXIT_OK
