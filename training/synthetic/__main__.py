"""python -m training.synthetic --out DIR --n-train N --n-test M --seed S (see README.md beside this file)."""

import sys

from training.synthetic.cli import main

main(sys.argv[1:])
