"""`relay` command line (placeholder until the server lands)."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("relay: not implemented yet", file=sys.stderr)
    return 2
