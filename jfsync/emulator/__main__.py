"""``python -m jfsync.emulator``: run the emulator from the command line."""

from __future__ import annotations

import argparse
import sys

from jfsync.emulator import cli


def main() -> int:
    """Parse the emulator's arguments and run it."""
    parser = argparse.ArgumentParser(prog="python -m jfsync.emulator")
    cli.add_arguments(parser)
    return cli.run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
