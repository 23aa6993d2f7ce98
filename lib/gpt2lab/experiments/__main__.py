"""`python -m gpt2lab.experiments run ...` / `report ...` (see cli.py). Used in notebook 09 (experiments)."""

import sys

from .cli import main

sys.exit(main())
