"""The root of memvisor's own errors.

Every failure that is memvisor's (bad arguments, missing files, boot failure, a guest panic) is raised as a
`MemvisorError` with a one-line message that names the problem and the fix. The CLI prints it and exits with
`EXIT_MEMVISOR_FAILURE`, so that a guest command's own exit status passes through unchanged.
"""

EXIT_MEMVISOR_FAILURE = 125


class MemvisorError(Exception):
    """A failure of memvisor itself, shown to the user as one line (no traceback)."""


class UsageError(MemvisorError):
    """Bad command-line or configuration input."""
