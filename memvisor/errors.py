"""The root of memvisor's own errors, and its three kinds.

Every failure that is memvisor's is a `MemvisorError` with a one-line message that names the problem and the
fix. The CLI prints it and exits with `EXIT_MEMVISOR_FAILURE`, so that a guest command's own exit status passes
through unchanged; QMP answers it as one GenericError, mapped once at its boundary (memvisor.control.server).

- `UsageError`: bad command-line, configuration or control-request input (the user's to fix).
- `GuestFault`: a guest driver broke a rule of its device (a malformed ring, an address outside its RAM or in
  unplugged memory). A device answers it as the specification says, counts it, and never lets it past the
  device: at worst the transport marks the device DEVICE_NEEDS_RESET. It never stops the VMM.
- `HostFailure`: a host operation failed (fallocate, fsync, mmap, a KVM ioctl). Reported in the log and on
  QMP (device counters), never blamed on the guest.
"""

EXIT_MEMVISOR_FAILURE = 125
# `memvisor lab`: the lab's own kernel crashed under the command (the command did not fail: it did not finish).
# scripts/test runs the guest tests that did not finish again in a fresh lab, once, on this status.
EXIT_LAB_CRASHED = 123


class MemvisorError(Exception):
    """A failure of memvisor itself, shown to the user as one line (no traceback); the CLI exits with
    `exit_status`."""

    exit_status = EXIT_MEMVISOR_FAILURE


class LabCrashed(MemvisorError):
    """The lab's kernel panicked while a command ran (its console shows the panic): exit status EXIT_LAB_CRASHED."""

    exit_status = EXIT_LAB_CRASHED


class UsageError(MemvisorError):
    """Bad command-line, configuration or control-request input."""


class GuestFault(MemvisorError):
    """A guest driver broke a rule: answered per the specification and counted by the device it reached."""


class HostFailure(MemvisorError):
    """A host operation failed; the guest did nothing wrong."""
