"""Deprecated name: `python -m sdsweep.leaderboard SWEEP_DIR` is now `python -m sdsweep.board SWEEP_DIR`."""

import sys

if __name__ == "__main__":
    from sdsweep.board.leaderboard import main

    print("sdsweep: `python -m sdsweep.leaderboard` is deprecated, use `python -m sdsweep.board`", file=sys.stderr)
    sys.exit(main())
