"""Distil a student on teacher top-K logits stored by extract_logits.py: SFT + loss_multi * KD (see trl_sdft/offline)."""

import sys

from trl_sdft.cli.offline import distill_main

if __name__ == "__main__":
    sys.exit(distill_main())
