"""Extract a teacher's top-K logits at every assistant token to Parquet (see trl_sdft/offline)."""

import sys

from trl_sdft.cli.offline import extract_main

if __name__ == "__main__":
    sys.exit(extract_main())
