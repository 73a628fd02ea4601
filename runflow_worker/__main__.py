"""``python -m runflow_worker``: the ``runflow-worker`` command."""

import sys

from runflow_worker.cli.main import main

sys.exit(main())
