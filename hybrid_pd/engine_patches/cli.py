"""``hybrid-pd patches``: list the engine patches and whether they apply here."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("patches", help="list hybrid-pd's engine patches and their status")
    p.add_argument("--json", action="store_true", help="one JSON object per patch")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hybrid_pd.engine_patches import registry

    # Check by applying in this process (exactly what happens inside an engine), then revert.
    rows = []
    for patch in registry.PATCHES:
        patch.apply()
        rows.append(patch.status())
    registry.revert_all()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        verdict = "applies" if row["state"] == "applied" else f"SKIPPED: {row['reason']}"
        print(f"{row['name']:<28} {verdict}")
        print(f"    target:  {row['target']}")
        print(f"    closes:  {row['closes']}")
        print(f"    tested:  {row['requirement']}")
    return 0
