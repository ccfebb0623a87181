"""``python -m composefsd.cli.composefsctl``: the console script without its wrapper."""

import sys

from composefsd.cli.composefsctl import main

sys.exit(main())
