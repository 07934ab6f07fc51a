"""`python -m memvisor` is the `memvisor` command."""

import sys

from memvisor.cli.main import main

sys.exit(main())
