"""``python -m harness`` runs the ``starttls-harness`` command."""

import sys

from harness.cli import main

sys.exit(main())
