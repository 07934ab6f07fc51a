"""The demo: boot a Debian guest with memvisor, print its kernel release and memory, power it off.

Run through `scripts/demo` (which sets the machine up first) or `python -m memvisor.demo`.
"""

import subprocess
import sys
import time


def main() -> int:
    command = "echo \"kernel: $(uname -r)\"; echo \"vCPUs: $(nproc)\"; free -m"
    argv = [sys.executable, "-m", "memvisor", "run", "--memory", "1G", "--vcpus", "2", "--exec", command]
    print(f"demo: {' '.join(argv[1:4])} ... (boots a Debian guest; through the lab when KVM here is not hardware)")
    started = time.monotonic()
    status = subprocess.call(argv)
    print(f"demo: the guest ran, powered off and memvisor exited with {status} after {time.monotonic() - started:.1f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
