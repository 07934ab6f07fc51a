"""The newc cpio writer: parsed back by our reader and listed/extracted by Debian's cpio."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor.guest import cpio

CPIO = shutil.which("cpio")
needs_cpio = pytest.mark.skipif(CPIO is None, reason="Debian's cpio is not installed")


def sample_entries(tmp_path: Path) -> list[cpio.InitramfsEntry]:
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 4099 + b"tail")  # not a multiple of 4: exercises padding
    big.chmod(0o640)
    return [
        cpio.directory("bin"),
        cpio.file_from_bytes("bin/hello", b"#!/bin/sh\necho hi\n", 0o755),
        cpio.file_from_bytes("empty", b""),
        cpio.file_from_path("big.bin", big),
        cpio.symlink("bin/sh", "/bin/busybox"),
        cpio.directory("dev", 0o700),
        cpio.char_device("dev/console", 5, 1),
        cpio.directory("a/b/c"),
        cpio.file_from_bytes("a/b/c/odd name-1", b"x"),
    ]


def test_round_trip_through_own_reader(tmp_path: Path) -> None:
    entries = sample_entries(tmp_path)
    out = tmp_path / "initrd"
    cpio.write_archive(out, entries)
    members = list(cpio.read_newc(out.read_bytes()))
    assert [m.name for m in members] == [e.path for e in entries]
    by_name = {m.name: m for m in members}
    assert by_name["bin/hello"].data == b"#!/bin/sh\necho hi\n"
    assert by_name["bin/hello"].mode == 0o100755
    assert by_name["big.bin"].data == (tmp_path / "big.bin").read_bytes()
    assert by_name["big.bin"].mode == 0o100640
    assert by_name["bin/sh"].data == b"/bin/busybox"
    assert by_name["bin/sh"].mode & 0o170000 == 0o120000
    assert by_name["dev"].mode == 0o040700
    assert by_name["dev/console"].mode == 0o020600
    assert by_name["dev/console"].rdev == (5, 1)
    assert by_name["empty"].data == b""
    assert len(out.read_bytes()) % 4 == 0


def test_gzip_round_trip(tmp_path: Path) -> None:
    entries = sample_entries(tmp_path)
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    cpio.write_archive(plain, entries)
    cpio.write_archive(packed, entries, compress=True)
    assert packed.read_bytes()[:2] == b"\x1f\x8b"
    assert list(cpio.read_newc(packed.read_bytes())) == list(cpio.read_newc(plain.read_bytes()))


def test_output_is_reproducible(tmp_path: Path) -> None:
    first, second = tmp_path / "1", tmp_path / "2"
    cpio.write_archive(first, sample_entries(tmp_path), compress=True)
    cpio.write_archive(second, sample_entries(tmp_path), compress=True)
    assert first.read_bytes() == second.read_bytes()


@needs_cpio
def test_debian_cpio_lists_it(tmp_path: Path) -> None:
    entries = sample_entries(tmp_path)
    out = tmp_path / "initrd"
    cpio.write_archive(out, entries)
    listing = subprocess.run(
        [str(CPIO), "-t", "--quiet"], stdin=out.open("rb"), capture_output=True, text=True, check=True
    )
    assert listing.stdout.splitlines() == [e.path for e in entries]
    verbose = subprocess.run(
        [str(CPIO), "-tv", "--quiet"], stdin=out.open("rb"), capture_output=True, text=True, check=True
    )
    console = next(line for line in verbose.stdout.splitlines() if line.endswith("dev/console"))
    assert console.startswith("crw-------") and "5,   1" in console


@needs_cpio
def test_debian_cpio_extracts_it(tmp_path: Path) -> None:
    entries = [e for e in sample_entries(tmp_path) if e.kind != "chardev"]
    out = tmp_path / "initrd"
    cpio.write_archive(out, entries)
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run([str(CPIO), "-id", "--quiet"], stdin=out.open("rb"), cwd=dest, check=True)
    assert (dest / "bin/hello").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (dest / "bin/hello").stat().st_mode & 0o777 == 0o755
    assert (dest / "big.bin").read_bytes() == (tmp_path / "big.bin").read_bytes()
    assert (dest / "bin/sh").readlink() == Path("/bin/busybox")
    assert (dest / "a/b/c/odd name-1").read_bytes() == b"x"


def test_entries_from_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\n")
    (root / "init").write_text("#!/bin/sh\n")
    (root / "init").chmod(0o755)
    (root / "lib64").symlink_to("lib")
    entries = cpio.entries_from_tree(root)
    assert [(e.path, e.kind) for e in entries] == [
        ("etc", "dir"),
        ("etc/passwd", "file"),
        ("init", "file"),
        ("lib64", "symlink"),
    ]
    assert next(e for e in entries if e.path == "init").mode == 0o755
    assert next(e for e in entries if e.path == "lib64").target == "lib"


def test_reader_rejects_garbage() -> None:
    with pytest.raises(cpio.CpioFormatError):
        list(cpio.read_newc(b"not a cpio archive at all, not at all" * 4))
    buf = io.BytesIO()
    cpio.write_newc(buf, [cpio.file_from_bytes("f", b"0123456789")])
    good = bytearray(buf.getvalue())
    with pytest.raises(cpio.CpioFormatError):
        list(cpio.read_newc(bytes(good[:120])))  # cut inside the data


_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(_names, st.binary(max_size=600), min_size=1, max_size=8))
def test_any_files_round_trip(files: dict[str, bytes]) -> None:
    buf = io.BytesIO()
    cpio.write_newc(buf, [cpio.file_from_bytes(name, data) for name, data in files.items()])
    assert {m.name: m.data for m in cpio.read_newc(buf.getvalue())} == files
