"""`python -m builder ...` is `samebox ...` (so `torchrun -m builder train ...` starts the trainer on every rank)."""

import sys

from builder.cli import main

sys.exit(main())
