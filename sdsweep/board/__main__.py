"""`python -m sdsweep.board SWEEP_DIR`: rebuild leaderboard.csv and report.html from the folders."""

import sys

from sdsweep.board.leaderboard import main

sys.exit(main())
