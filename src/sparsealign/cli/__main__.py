"""``python -m sparsealign.cli``: the same as the ``sparsealign`` command."""

import sys

from sparsealign.cli import main

sys.exit(main())
