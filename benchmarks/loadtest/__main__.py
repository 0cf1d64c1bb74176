import sys

from benchmarks.loadtest.command import entry

sys.exit(entry())
