"""Errors a job reports as one console line (the CLI prints them without a traceback)."""

from __future__ import annotations


class JobFailed(RuntimeError):
    """Work failed on the cluster (not a user mistake): the message names what failed and
    the log file that holds the detail. The CLI exits with status 1."""
