"""python -m training.synthetic --out DIR --n-train N --n-test M --seed S (see training/synthetic/README.md)."""

import sys

from training.synthetic import main

main(sys.argv[1:])
