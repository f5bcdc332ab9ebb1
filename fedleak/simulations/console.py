"""The `fedleak` console script: the command line, loaded inside its own Ctrl-C handler."""

from __future__ import annotations

import sys

EXIT_INTERRUPTED = 130


def main() -> int:
    """Load the command line, then run it. Loading takes most of a second (torch and the
    settings): a Ctrl-C in that time is the same one line as later, not a traceback."""
    try:
        from fedleak.simulations.cli import main as run
    except KeyboardInterrupt:
        print("fedleak: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return run()


if __name__ == "__main__":
    sys.exit(main())
