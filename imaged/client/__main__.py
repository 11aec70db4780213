"""`python -m imaged.client` runs the imaged-client CLI."""

import sys

from .cli import main

sys.exit(main())
