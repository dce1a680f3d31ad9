"""``python -m broker`` runs the ``presque`` command line."""

import sys

from broker.cli import main

sys.exit(main())
