#!/usr/bin/env python3
"""Run imaged from a source tree: python imaged.py --config FILE."""

import sys

# The package directory imaged/ next to this script wins over this file
# when importing "imaged".
from imaged.main import main

if __name__ == "__main__":
    sys.exit(main())
