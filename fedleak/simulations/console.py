"""The `fedleak` console script: the command line, loaded inside its own Ctrl-C handler."""

from __future__ import annotations

import os
import signal
import sys

EXIT_ERROR, EXIT_INTERRUPTED = 1, 130


def _terminated(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    """Load the command line, then run it. Loading takes most of a second (torch and the
    settings): a Ctrl-C in that time is the same one line as later, not a traceback. A SIGTERM
    (a scheduler ending the job) is a Ctrl-C from the start: before a run installs its own
    handling it ended the process with no word (exit -15)."""
    signal.signal(signal.SIGTERM, _terminated)
    try:
        os.getcwd()
    except FileNotFoundError:  # torch's libraries then fail to load with a fatal MKL line
        print("fedleak: error: the working directory no longer exists; cd to one", file=sys.stderr)
        return EXIT_ERROR
    try:
        from fedleak.simulations.cli import main as run
    except KeyboardInterrupt:
        print("fedleak: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return run()


if __name__ == "__main__":
    sys.exit(main())
