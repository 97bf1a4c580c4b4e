"""``python -m nbdqcow``: same as the ``nbdqcow`` console script."""

import sys

from nbdqcow.cli import main

sys.exit(main())
