"""``python -m composefsd``: the daemon, as the ``composefsd`` console script runs it."""

import sys

from composefsd.service.daemon import main

sys.exit(main())
