"""`python -m trl_sdft.cli`: the `trl-sdft` command (what `launch.relaunch_cpu_processes` starts in each process)."""

import sys

from .sdft import main

sys.exit(main())
