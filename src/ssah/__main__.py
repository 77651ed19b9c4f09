"""``python -m ssah`` (also under ``accelerate launch -m ssah``)."""

import sys

from ssah.cli import main

sys.exit(main())
