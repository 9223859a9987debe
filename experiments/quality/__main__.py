"""`python -m experiments.quality`: see experiments/quality/__init__.py."""

import sys

from experiments.common import script_logging
from experiments.quality.run import main

if __name__ == "__main__":
    script_logging()
    main()
    sys.exit(0)
