"""`python -m sdsweep.eval TRIAL_DIR [key=value ...]`: re-sample and re-score a finished trial."""

import sys

from sdsweep.eval.evaluate import main

sys.exit(main())
