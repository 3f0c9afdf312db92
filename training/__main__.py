"""`python -m training ...` is the same as the `trainyard` command."""

import sys

from training.cli import main

sys.exit(main())
