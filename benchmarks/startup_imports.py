"""Where `memvisor run` spends its Python start-up: `-X importtime` of a real boot, until the guest's /init.

Run inside the lab (Python start-up is what dominates there):
    memvisor lab -- .venv/bin/python benchmarks/startup_imports.py [--top 25]

It boots the built default image the way benchmarks/boot_vs_qemu.py does (`run --lab off --kernel --initrd
--console FILE`, no devices), stops it once /init has printed its marker, and prints the slowest imports by
cumulative time, the total import time of the top-level imports, and the wall time from spawn to /init.
"""

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARKER_LINE = re.compile(rb"memvisor-init: started[^\n]*\n")  # the whole line, with init's uptime
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memvisor.guest.image import find_guest_image  # noqa: E402


def parse_importtime(text: str) -> list[tuple[int, int, str]]:
    """(self us, cumulative us, indented name) for each `import time:` line, in the order printed."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, name = line.removeprefix("import time:").split("|", 2)
        rows.append((int(self_us), int(cumulative_us), name.rstrip()))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=25, help="how many imports to list")
    args = parser.parse_args()
    image = find_guest_image("default")
    if image is None:
        sys.exit("no guest image: run `memvisor image build` on the host first")
    with tempfile.TemporaryDirectory() as tmp:
        console, log = Path(tmp) / "console.log", Path(tmp) / "importtime.txt"
        argv = [sys.executable, "-X", "importtime", "-m", "memvisor", "run", "--lab", "off", "--memory", "1G",
                "--kernel", str(image.kernel), "--initrd", str(image.initrd), "--console", str(console)]  # fmt: skip
        started = time.monotonic()
        with log.open("wb") as stderr:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
            try:
                while not (console.exists() and MARKER_LINE.search(console.read_bytes())):
                    if process.poll() is not None or time.monotonic() - started > 180:
                        sys.exit(f"memvisor ended or timed out before /init:\n{log.read_text()[-2000:]}")
                    time.sleep(0.01)
                reached = time.monotonic() - started
                marker = MARKER_LINE.search(console.read_bytes())
                assert marker is not None
            finally:
                process.terminate()
                process.wait()
        rows = parse_importtime(log.read_text())
    top_level = sum(cumulative for _, cumulative, name in rows if not name.startswith("  "))
    print(f"guest: {marker.group().decode(errors='replace').strip()}")
    print(f"spawn to /init: {reached:.2f} s; imports: {len(rows)} modules, {top_level / 1e6:.2f} s in total")
    for self_us, cumulative_us, name in sorted(rows, key=lambda row: -row[1])[: args.top]:
        print(f"{cumulative_us / 1e6:7.2f} s cumulative {self_us / 1e6:6.2f} s self  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
