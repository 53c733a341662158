"""The `hybrid-pd` command: one sub-command per module that owns the feature."""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> module exposing `add_parser(subparsers)`; imported lazily so that
# `hybrid-pd plan` never pays for importing vLLM.
_COMMANDS: dict[str, str] = {
    "make-model": "hybrid_pd.tiny_models",
    "serve": "hybrid_pd.serve.cli",
    "proxy": "hybrid_pd.serve.proxy_cli",
    "demo": "hybrid_pd.demo",
    "patches": "hybrid_pd.engine_patches.cli",
    "plan": "hybrid_pd.planner.cli",
    "bench": "hybrid_pd.bench.cli",
    "dashboard": "hybrid_pd.dashboard.cli",
}


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybrid-pd",
        description="Disaggregated prefill/decode for hybrid SSM + attention models on vLLM + NIXL.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _COMMANDS.items():
        if selected is not None and name != selected:
            sub.add_parser(name, help=f"(see hybrid-pd {name} --help)")
            continue
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = argv[0] if argv and argv[0] in _COMMANDS else None
    parser = build_parser(selected)
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
