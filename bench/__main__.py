"""`python -m bench`: dispatch to `bench.cli.main`."""

import sys

from bench.cli import main

sys.exit(main())
