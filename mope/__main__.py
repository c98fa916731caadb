"""``python -m mope`` (and ``torchrun -m mope``): the mope command line."""

import sys

from mope.cli import main

sys.exit(main())
