"""The red-team harness: bad inputs through the real command lines, as users would give them by mistake and as a
hostile input would, each classified by what happened. `python -m red_team --help`; the cases are `cases.yaml`."""
