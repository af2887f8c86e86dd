"""``python -m lightning_peft.cli``: the ``lightning-peft`` console script."""

import sys

from lightning_peft.cli import main

sys.exit(main())
