"""`python -m edgeslm` runs the command line."""

import sys

from edgeslm.cli import main

sys.exit(main())
