"""``python -m starttls_harness`` runs the ``starttls-harness`` command."""

import sys

from starttls_harness.cli import main

sys.exit(main())
