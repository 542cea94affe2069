"""`python -m replicax`: the same command line as the `replicax` script."""

import sys

from ._cli import main


if __name__ == "__main__":
    sys.exit(main())
