"""`python -m cosyvoice2`: the `cosyvoice2` command (`cosyvoice2.cli`)."""

import sys

from cosyvoice2.cli import main

if __name__ == "__main__":
    sys.exit(main())
