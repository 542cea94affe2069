"""`python -m benchmarks [options]`: the same suite as `replicax bench [options]`."""

import sys

from replicax._cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
