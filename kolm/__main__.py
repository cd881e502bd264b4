"""``python -m kolm``: the ``kolm`` command."""

import sys

from kolm.cli.main import main

sys.exit(main())
