import sys

from imaged.main import main

sys.exit(main())
