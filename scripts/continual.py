"""Continual learning, SFT vs SDFT: `python scripts/continual.py --method both --tasks facts,tool_call,identity`."""

import sys

from trl_sdft.cli.continual import main

if __name__ == "__main__":
    sys.exit(main())
