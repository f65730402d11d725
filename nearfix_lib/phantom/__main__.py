"""``python -m nearfix_lib.phantom OUT [--cases N] [--shape I J K] ...``: write a phantom data root."""

import sys

from nearfix_lib.phantom.dataset import main

sys.exit(main())
