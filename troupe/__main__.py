"""`python -m troupe ...`, the same as the `troupe` command."""

import sys

from troupe.cluster.cli import main

sys.exit(main())
