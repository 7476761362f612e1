"""Deprecated name: `python -m sdsweep.evaluate TRIAL_DIR` is now `python -m sdsweep.eval TRIAL_DIR`."""

import sys

if __name__ == "__main__":
    from sdsweep.eval.evaluate import main

    print("sdsweep: `python -m sdsweep.evaluate` is deprecated, use `python -m sdsweep.eval`", file=sys.stderr)
    sys.exit(main())
