"""The `detr-jax` command: parses arguments and calls library functions, nothing more.

    detr-jax convert SRC OUT [--config NAME]       PyTorch checkpoint -> detr-jax checkpoint
    detr-jax predict CHECKPOINT IMAGES... --out DIR
    detr-jax train --config NAME --data DIR --workdir DIR
    detr-jax eval CHECKPOINT --data DIR --split val2017
    detr-jax demo [--workdir DIR]

Each subcommand registers itself with `add_<name>_command(subparsers)`.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def add_convert_command(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert a PyTorch DETR checkpoint (same as convert_weights.py)",
                              add_help=False)
    p.set_defaults(run=lambda args, rest: __import__("detr_jax.convert", fromlist=["main"]).main(rest))


COMMANDS = [add_convert_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detr-jax", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if rest and args.command != "convert":
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    return int(args.run(args, rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
