"""Pinned Debian packages: the pins file, the per-user cache, and fetching with `apt-get download`.

`pins.json` (next to this module) names every Debian package the guest and lab images are made of, at one
version each, with the sha256 of its .deb as published in the archive's signed index. A fetched .deb whose
checksum differs is refused; the pins move only on purpose, through `memvisor image pin`, which asks apt for the
newest versions it knows and rewrites the file.

Cache layout (`cache_dir()`: `$MEMVISOR_CACHE`, else `$XDG_CACHE_HOME/memvisor`, else `~/.cache/memvisor`):
    packages/<name>_<version>/      one unpacked .deb; `.memvisor-sha256` inside marks it complete
    images/<kind>-<flavour>-<key>/  built kernel + initramfs (see image.py)
Everything is created in a temporary folder and renamed into place, so an interrupted run leaves no half
result. Inside the lab the cache is read-only (`MEMVISOR_IN_LAB=1`): things are only found there, never made.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from memvisor.errors import MemvisorError

Progress = Callable[[str], None] | None

PINS_PATH = Path(__file__).with_name("pins.json")
# The kernel flavours memvisor can boot, by name, with the Debian package name pattern of each (bookworm, 6.1).
KERNEL_FLAVOURS: dict[str, re.Pattern[str]] = {
    "default": re.compile(r"^linux-image-6\.1\.0-(\d+)-amd64$"),
    "cloud": re.compile(r"^linux-image-6\.1\.0-(\d+)-cloud-amd64$"),
}
# Userspace packages of the guest: busybox, mkfs.ext4/e2fsck/debugfs and every library they load.
USERSPACE_PACKAGES = (
    "busybox-static",
    "e2fsprogs",
    "libext2fs2",
    "libcom-err2",
    "libblkid1",
    "libuuid1",
    "libss2",
    "libc6",
)
_MARKER = ".memvisor-sha256"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_FIX_PIN = "move the pins on purpose with `memvisor image pin`"


@dataclass(frozen=True)
class Pin:
    """One Debian package at one version, with the sha256 of its .deb."""

    package: str
    version: str
    sha256: str

    def as_json(self) -> dict[str, str]:
        return {"package": self.package, "version": self.version, "sha256": self.sha256}


@dataclass(frozen=True)
class Pins:
    """The whole pins file: one kernel per flavour and the userspace packages."""

    kernels: dict[str, Pin]
    packages: dict[str, Pin]

    def kernel(self, flavour: str) -> Pin:
        """The kernel pin of `flavour` ("default" or "cloud"); UsageError-like MemvisorError otherwise."""
        if flavour not in self.kernels:
            raise MemvisorError(
                f"unknown kernel flavour {flavour!r}: choose one of {', '.join(sorted(self.kernels))}"
            )
        return self.kernels[flavour]

    def package(self, name: str) -> Pin:
        """The pin of the userspace package `name`."""
        if name not in self.packages:
            raise MemvisorError(f"package {name} is not pinned in {PINS_PATH}: {_FIX_PIN}")
        return self.packages[name]


def _parse_pin(raw: object, where: str) -> Pin:
    if not isinstance(raw, dict):
        raise MemvisorError(f"{PINS_PATH}: {where} must be an object: restore the file from git")
    fields = {}
    for key in ("package", "version", "sha256"):
        value = raw.get(key)
        if not isinstance(value, str) or not value:
            raise MemvisorError(
                f"{PINS_PATH}: {where} lacks {key!r}: restore the file from git or {_FIX_PIN}"
            )
        fields[key] = value
    if not _SHA256_RE.match(fields["sha256"]):
        raise MemvisorError(f"{PINS_PATH}: {where} has a malformed sha256: restore the file from git")
    return Pin(**fields)


def parse_pins(document: object) -> Pins:
    """Validate a decoded pins document (see pins.json) and return it as `Pins`."""
    if not isinstance(document, dict):
        raise MemvisorError(f"{PINS_PATH} is not a JSON object: restore the file from git")
    kernels_raw = document.get("kernels")
    packages_raw = document.get("packages")
    if not isinstance(kernels_raw, dict) or not isinstance(packages_raw, dict):
        raise MemvisorError(f"{PINS_PATH} needs 'kernels' and 'packages' objects: restore the file from git")
    kernels = {flavour: _parse_pin(raw, f"kernels.{flavour}") for flavour, raw in kernels_raw.items()}
    packages = {name: _parse_pin(raw, f"packages.{name}") for name, raw in packages_raw.items()}
    for flavour, pin in kernels.items():
        pattern = KERNEL_FLAVOURS.get(flavour)
        if pattern is None or not pattern.match(pin.package):
            raise MemvisorError(f"{PINS_PATH}: kernels.{flavour} names {pin.package}, not a {flavour} kernel")
    for name, pin in packages.items():
        if pin.package != name:
            raise MemvisorError(
                f"{PINS_PATH}: packages.{name} names {pin.package}: restore the file from git"
            )
    return Pins(kernels, packages)


def load_pins(path: Path = PINS_PATH) -> Pins:
    """Read and validate the pins file."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MemvisorError(
            f"cannot read the package pins {path} ({exc}): restore the file from git"
        ) from exc
    return parse_pins(document)


def save_pins(pins: Pins, path: Path = PINS_PATH) -> None:
    """Write `pins` to `path` atomically, in the layout `parse_pins` reads."""
    document = {
        "comment": "Debian bookworm packages the guest and lab images are built from; "
        "move with `memvisor image pin`, never by hand.",
        "kernels": {flavour: pin.as_json() for flavour, pin in sorted(pins.kernels.items())},
        "packages": {name: pin.as_json() for name, pin in sorted(pins.packages.items())},
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(tmp, path)


# --- the cache ----------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The per-user cache folder: `$MEMVISOR_CACHE`, `$XDG_CACHE_HOME/memvisor` or `~/.cache/memvisor`."""
    if os.environ.get("MEMVISOR_CACHE"):
        return Path(os.environ["MEMVISOR_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "memvisor"
    return Path.home() / ".cache" / "memvisor"


def in_lab() -> bool:
    """True inside the lab, whose cache is a read-only view of the host's."""
    return os.environ.get("MEMVISOR_IN_LAB") == "1"


def cache_writable(cache: Path) -> bool:
    """Whether new things can be made in `cache` (never inside the lab; otherwise, try it)."""
    if in_lab():
        return False
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache):
            pass
    except OSError:
        return False
    return True


def _safe(version: str) -> str:
    """A Debian version as a folder-name part (epochs contain ':')."""
    return re.sub(r"[^A-Za-z0-9.+~-]", "_", version)


def package_dir(pin: Pin, cache: Path | None = None) -> Path:
    """Where `pin`'s unpacked .deb lives in the cache (it may not exist yet)."""
    return (cache or cache_dir()) / "packages" / f"{pin.package}_{_safe(pin.version)}"


def _is_complete(folder: Path, sha256: str) -> bool:
    try:
        return (folder / _MARKER).read_text().strip() == sha256
    except OSError:
        return False


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def require_tool(name: str, package: str) -> str:
    """The path of the host program `name`, or a MemvisorError saying which Debian package provides it."""
    found = shutil.which(name)
    if found is None:
        raise MemvisorError(
            f"{name} is not installed, and the guest image is built from Debian packages with it: "
            f"run memvisor on Debian/Ubuntu with `{package}` installed (apt-get install {package})"
        )
    return found


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)


def _last_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not line.startswith("W:")]
    return lines[-1] if lines else "no message"


def fetch_package(
    name: str, version: str, sha256: str, *, progress: Progress = None, cache: Path | None = None
) -> Path:
    """Download `name`=`version` with apt-get, check its sha256, unpack it; return the unpacked folder.

    Returns at once, offline, when the cache already holds it. Raises MemvisorError when apt-get or
    dpkg-deb is missing, the download fails (with the fix: `apt-get update`), the checksum differs from the
    pin, or the cache is read-only (inside the lab) and lacks the package.
    """
    pin = Pin(name, version, sha256)
    cache = cache or cache_dir()
    dest = package_dir(pin, cache)
    if _is_complete(dest, sha256):
        return dest
    if not cache_writable(cache):
        raise MemvisorError(
            f"{name} {version} is not in the read-only cache {cache}: "
            "run `memvisor image build` on the host (outside the lab) first"
        )
    apt_get = require_tool("apt-get", "apt")
    dpkg_deb = require_tool("dpkg-deb", "dpkg")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp_name:
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o755)  # apt drops to the _apt user for downloads when it can read the folder
        if progress:
            progress(f"downloading {name} {version}")
        result = _run([apt_get, "download", "-q", f"{name}={version}"], cwd=tmp)
        debs = sorted(tmp.glob("*.deb"))
        if result.returncode != 0 or len(debs) != 1:
            raise MemvisorError(
                f"apt-get could not download {name}={version} ({_last_error_line(result.stderr)}): "
                f"run `apt-get update` (as root) and retry; if the version left the archive, {_FIX_PIN}"
            )
        actual = sha256_file(debs[0])
        if actual != sha256:
            raise MemvisorError(
                f"{name} {version}: the downloaded .deb has sha256 {actual}, but pins.json says {sha256}: "
                f"if the archive really changed, {_FIX_PIN}"
            )
        root = tmp / "root"
        result = _run([dpkg_deb, "-x", str(debs[0]), str(root)])
        if result.returncode != 0:
            raise MemvisorError(
                f"dpkg-deb could not unpack {debs[0].name} ({_last_error_line(result.stderr)}): "
                f"remove {dest.parent} and retry"
            )
        (root / _MARKER).write_text(sha256 + "\n")
        if dest.exists():
            shutil.rmtree(dest)  # an incomplete leftover (no marker)
        try:
            os.rename(root, dest)
        except OSError:
            if not _is_complete(dest, sha256):  # another process finished the same package first: fine
                raise
    return dest


def fetch_pin(pin: Pin, *, progress: Progress = None, cache: Path | None = None) -> Path:
    """`fetch_package` for a `Pin`."""
    return fetch_package(pin.package, pin.version, pin.sha256, progress=progress, cache=cache)


# --- moving the pins ----------------------------------------------------------------------------------------


def _apt_cache(*args: str) -> str:
    apt_cache = require_tool("apt-cache", "apt")
    result = _run([apt_cache, *args])
    if result.returncode != 0:
        raise MemvisorError(
            f"apt-cache {' '.join(args)} failed ({_last_error_line(result.stderr)}): run `apt-get update` and retry"
        )
    return result.stdout


def candidate(name: str) -> Pin:
    """The version apt would install of `name`, with its sha256, from `apt-cache show`."""
    fields: dict[str, str] = {}
    for line in _apt_cache("show", "--no-all-versions", name).splitlines():
        key, sep, value = line.partition(":")
        if sep and key in ("Package", "Version", "SHA256") and key not in fields:
            fields[key] = value.strip()
    if "Version" not in fields or "SHA256" not in fields:
        raise MemvisorError(f"apt knows no installable {name}: run `apt-get update` and retry")
    return Pin(name, fields["Version"], fields["SHA256"].lower())


def newest_kernel_package(flavour: str) -> str:
    """The newest `linux-image-6.1.0-N-<flavour>` package name apt knows (largest ABI number N)."""
    pattern = KERNEL_FLAVOURS[flavour]
    found: list[tuple[int, str]] = []
    for line in _apt_cache("search", "--names-only", r"^linux-image-6\.1\.0-[0-9]+-").splitlines():
        name = line.split(" ", 1)[0]
        match = pattern.match(name)
        if match:
            found.append((int(match.group(1)), name))
    if not found:
        raise MemvisorError(f"apt knows no {flavour} 6.1 kernel package: run `apt-get update` and retry")
    return max(found)[1]


def move_pins(
    flavours: list[str] | None = None, *, path: Path = PINS_PATH, progress: Progress = None
) -> list[tuple[str, str, str]]:
    """Move the pins to the newest versions apt knows and rewrite the pins file.

    `flavours` limits the kernels moved (and then leaves the userspace packages alone); None moves
    everything. Returns (what, old, new) for each pin, old = new when it did not move.
    """
    try:
        old = load_pins(path)
    except MemvisorError:
        old = Pins({}, {})
    kernels = dict(old.kernels)
    packages = dict(old.packages)
    changes: list[tuple[str, str, str]] = []
    for flavour in flavours or sorted(KERNEL_FLAVOURS):
        if flavour not in KERNEL_FLAVOURS:
            raise MemvisorError(
                f"unknown kernel flavour {flavour!r}: choose one of {', '.join(KERNEL_FLAVOURS)}"
            )
        if progress:
            progress(f"looking up the newest {flavour} kernel")
        new = candidate(newest_kernel_package(flavour))
        before = kernels.get(flavour)
        changes.append(
            (
                f"kernel {flavour}",
                f"{before.package} {before.version}" if before else "-",
                f"{new.package} {new.version}",
            )
        )
        kernels[flavour] = new
    if flavours is None:
        for name in USERSPACE_PACKAGES:
            new = candidate(name)
            before = packages.get(name)
            changes.append((name, before.version if before else "-", new.version))
            packages[name] = new
    save_pins(Pins(kernels, packages), path)
    return changes
