import sys

from red_team.harness import main

sys.exit(main())
