"""`python -m firmware_bridge`: the same as `edgeslm bridge` (see cli.py)."""

import sys

from firmware_bridge.cli import main

sys.exit(main())
