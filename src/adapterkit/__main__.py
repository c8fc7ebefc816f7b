"""``python -m adapterkit``, which is how torchrun starts the command: ``torchrun ... -m adapterkit train ...``."""

import sys

from .cli import main

sys.exit(main())
