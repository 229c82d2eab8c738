"""The ``shmem`` command (also ``python -m shmem``).

Exit codes: 0 success, 1 failure or nothing matched, 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="shmem", description="Shared memory between Python processes.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("demo", help="two processes share a block; print what happened and how long it took")
    commands.add_parser("gc", help="remove abandoned shmem blocks and print their names")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from ._demo import run

        return run()
    if args.command == "gc":
        from ._lifecycle import gc

        for block in gc():
            print(f"removed {block.name} ({block.size} bytes, creator pid {block.creator_pid})")
        return 0
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
