"""SDFT from the command line: `python scripts/sdft.py --config configs/demo.yaml` (or any SDFTConfig flag).

Same as the `trl-sdft` console script. Run `python scripts/sdft.py --help` for every flag.
"""

import sys

from trl_sdft.cli import main

if __name__ == "__main__":
    sys.exit(main())
