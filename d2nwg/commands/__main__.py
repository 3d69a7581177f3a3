"""``python -m d2nwg.commands``: the ``d2nwg`` command."""

import sys

from d2nwg.commands import main

sys.exit(main())
