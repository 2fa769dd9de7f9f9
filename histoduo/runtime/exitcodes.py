"""The exit statuses every command shares (documented in README.md and docs/cli.md).

A batch scheduler (SLURM's ``afterok``) only sees the status, so a run that went on past
failed slides with ``--skip-errors`` must not look like a clean one.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1  # the run stopped: bad input, or a slide failed without --skip-errors
# (2 is the usage error of the option parser)
EXIT_SOME_FAILED = 3  # --skip-errors: every slide was tried, tables written, some failed
