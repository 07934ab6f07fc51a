"""The image builder without the network: pins schema, cache folder, image key, fetch errors, modules, ELF."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from memvisor.errors import MemvisorError
from memvisor.guest import elf, image, packages
from memvisor.guest.modules import ModuleSet, module_name, parse_modules_dep
from memvisor.guest.packages import Pin, Pins

# --- pins.json ----------------------------------------------------------------------------------------------


def test_repository_pins_are_complete_and_well_formed() -> None:
    raw = json.loads(packages.PINS_PATH.read_text())
    pins = packages.load_pins()
    assert set(pins.kernels) == {"default", "cloud"}
    assert pins.kernel("default").package.endswith("-amd64")
    assert not pins.kernel("default").package.endswith("-cloud-amd64")
    assert pins.kernel("cloud").package.endswith("-cloud-amd64")
    assert set(pins.packages) == set(packages.USERSPACE_PACKAGES)
    for section in ("kernels", "packages"):
        for entry in raw[section].values():
            assert set(entry) == {"package", "version", "sha256"}
            assert len(entry["sha256"]) == 64 and int(entry["sha256"], 16) >= 0


def _document() -> dict[str, object]:
    return json.loads(packages.PINS_PATH.read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["kernels"]["default"].pop("sha256"), "lacks 'sha256'"),
        (lambda d: d["kernels"]["default"].update(sha256="xyz"), "malformed sha256"),
        (lambda d: d["kernels"].update(default=d["kernels"]["cloud"]), "not a default kernel"),
        (lambda d: d["kernels"].update(weird=d["kernels"]["cloud"]), "not a weird kernel"),
        (lambda d: d["packages"]["libc6"].update(package="libc7"), "names libc7"),
        (lambda d: d.pop("packages"), "needs 'kernels' and 'packages'"),
    ],
)
def test_malformed_pins_are_refused(mutate: object, message: str) -> None:
    document = _document()
    mutate(document)  # type: ignore[operator]
    with pytest.raises(MemvisorError, match=message):
        packages.parse_pins(document)


def test_pins_save_and_load_round_trip(tmp_path: Path) -> None:
    pins = packages.load_pins()
    path = tmp_path / "pins.json"
    packages.save_pins(pins, path)
    assert packages.load_pins(path) == pins
    with pytest.raises(MemvisorError, match="unknown kernel flavour 'rt'"):
        pins.kernel("rt")


def test_unreadable_pins_name_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "pins.json"
    path.write_text("{not json")
    with pytest.raises(MemvisorError, match="restore the file from git"):
        packages.load_pins(path)


# --- the cache folder ---------------------------------------------------------------------------------------


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MEMVISOR_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert packages.cache_dir() == tmp_path / "home" / ".cache" / "memvisor"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert packages.cache_dir() == tmp_path / "xdg" / "memvisor"
    monkeypatch.setenv("MEMVISOR_CACHE", str(tmp_path / "mine"))
    assert packages.cache_dir() == tmp_path / "mine"


def test_cache_is_read_only_in_the_lab(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MEMVISOR_IN_LAB", raising=False)
    assert packages.cache_writable(tmp_path / "c")
    monkeypatch.setenv("MEMVISOR_IN_LAB", "1")
    assert not packages.cache_writable(tmp_path / "c")


def test_unwritable_cache_is_detected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MEMVISOR_IN_LAB", raising=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert not packages.cache_writable(blocker / "cache")  # a file where a folder should be


# --- the image key ------------------------------------------------------------------------------------------


def _key(pins: list[Pin], texts: list[Path], modules: tuple[str, ...] = image.GUEST_MODULES) -> str:
    return image.image_key("guest", "default", pins, modules, texts)


def test_image_key_follows_init_script_pins_and_modules(tmp_path: Path) -> None:
    init, agent = tmp_path / "init.sh", tmp_path / "agent.sh"
    shutil.copyfile(image.INIT_TEMPLATE, init)
    shutil.copyfile(image.AGENT_SCRIPT, agent)
    pins = [packages.load_pins().kernel("default")]
    first = _key(pins, [init, agent])
    assert _key(pins, [init, agent]) == first  # stable
    init.write_text(init.read_text() + "# one more line\n")
    second = _key(pins, [init, agent])
    assert second != first
    agent.write_text(agent.read_text().replace("MVAGENT READY", "MVAGENT READY "))
    third = _key(pins, [init, agent])
    assert third not in (first, second)
    moved = [Pin(pins[0].package, pins[0].version + "+1", pins[0].sha256)]
    assert _key(moved, [init, agent]) != third
    assert _key(pins, [init, agent], image.GUEST_MODULES[:-1]) != third


def _fake_image(cache: Path, flavour: str) -> Path:
    used, texts = image._guest_recipe(flavour)
    key = image.image_key(
        "guest", flavour, used, [*image.GUEST_MODULES, *image.GUEST_OPTIONAL_MODULES], texts
    )
    folder = cache / "images" / f"guest-{flavour}-{key}"
    folder.mkdir(parents=True)
    (folder / "vmlinuz").write_bytes(b"kernel")
    (folder / "initrd.img").write_bytes(b"initrd")
    (folder / "image.json").write_text(json.dumps({"kernel_release": "6.1.0-99-amd64", "flavour": flavour}))
    return folder


def test_lab_finds_a_cached_image_without_building(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEMVISOR_CACHE", str(tmp_path))
    monkeypatch.setenv("MEMVISOR_IN_LAB", "1")
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    folder = _fake_image(tmp_path, "cloud")
    found = image.ensure_guest_image("cloud")
    assert found == image.GuestImage(folder / "vmlinuz", folder / "initrd.img", "6.1.0-99-amd64", "cloud")
    assert image.find_guest_image("cloud") == found
    assert image.find_guest_image("default") is None


def test_lab_without_the_image_says_to_build_on_the_host(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MEMVISOR_CACHE", str(tmp_path))
    monkeypatch.setenv("MEMVISOR_IN_LAB", "1")
    with pytest.raises(MemvisorError, match=r"read-only.*memvisor image build --flavour default"):
        image.ensure_guest_image("default")
    assert not (tmp_path / "images").exists()  # nothing was written


def test_unknown_flavour_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEMVISOR_CACHE", str(tmp_path))
    with pytest.raises(MemvisorError, match="unknown kernel flavour 'rt'"):
        image.ensure_guest_image("rt")


# --- fetching -----------------------------------------------------------------------------------------------


def _tools_dir(tmp_path: Path, apt_get_script: str | None) -> Path:
    """A PATH folder holding a fake apt-get (if given) and the real dpkg-deb."""
    tools = tmp_path / "tools"
    tools.mkdir(exist_ok=True)
    if apt_get_script is not None:
        (tools / "apt-get").write_text("#!/bin/sh\n" + apt_get_script)
        (tools / "apt-get").chmod(0o755)
    dpkg_deb = shutil.which("dpkg-deb")
    if dpkg_deb:
        (tools / "dpkg-deb").symlink_to(dpkg_deb)
    return tools


def test_missing_apt_get_names_the_problem(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(_tools_dir(tmp_path, None)))
    monkeypatch.delenv("MEMVISOR_IN_LAB", raising=False)
    with pytest.raises(MemvisorError, match=r"apt-get is not installed.*apt-get install apt") as info:
        packages.fetch_package("busybox-static", "1", "0" * 64, cache=tmp_path / "cache")
    assert "\n" not in str(info.value)


def test_failed_download_says_apt_get_update(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    script = "echo \"E: Version '1' for 'busybox-static' was not found\" >&2\nexit 100\n"
    monkeypatch.setenv("PATH", str(_tools_dir(tmp_path, script)))
    monkeypatch.delenv("MEMVISOR_IN_LAB", raising=False)
    with pytest.raises(
        MemvisorError, match=r"could not download busybox-static=1 \(E: Version.*run `apt-get update`"
    ):
        packages.fetch_package("busybox-static", "1", "0" * 64, cache=tmp_path / "cache")
    assert list((tmp_path / "cache" / "packages").iterdir()) == []  # the temporary folder is gone


def _make_deb(tmp_path: Path) -> Path:
    tree = tmp_path / "debtree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        "Package: mvtest\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\nDescription: test\n"
    )
    (tree / "usr" / "share").mkdir(parents=True)
    (tree / "usr" / "share" / "hello.txt").write_text("hello\n")
    deb = tmp_path / "mvtest_1.0_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-b", str(tree), str(deb)], check=True, capture_output=True
    )
    return deb


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_fetch_checks_sha256_unpacks_and_then_works_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    deb = _make_deb(tmp_path)
    good = hashlib.sha256(deb.read_bytes()).hexdigest()
    # The fake apt-get shadows the real one; dpkg-deb needs tar from the system folders.
    monkeypatch.setenv("PATH", f"{_tools_dir(tmp_path, f'cp {deb} .')}:/usr/bin:/bin")
    monkeypatch.delenv("MEMVISOR_IN_LAB", raising=False)
    cache = tmp_path / "cache"
    with pytest.raises(
        MemvisorError, match=r"mvtest 1\.0: the downloaded \.deb has sha256 .*memvisor image pin"
    ):
        packages.fetch_package("mvtest", "1.0", "1" * 64, cache=cache)
    seen: list[str] = []
    root = packages.fetch_package("mvtest", "1.0", good, cache=cache, progress=seen.append)
    assert (root / "usr" / "share" / "hello.txt").read_text() == "hello\n"
    assert seen == ["downloading mvtest 1.0"]
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # offline, no tools: found in the cache
    assert packages.fetch_package("mvtest", "1.0", good, cache=cache) == root
    monkeypatch.setenv("MEMVISOR_IN_LAB", "1")
    assert packages.fetch_package("mvtest", "1.0", good, cache=cache) == root
    with pytest.raises(MemvisorError, match="not in the read-only cache"):
        packages.fetch_package("mvtest", "2.0", good, cache=cache)


def test_pins_mapping_type() -> None:
    pins = Pins({}, {"x": Pin("x", "1", "a" * 64)})
    assert pins.package("x").version == "1"
    with pytest.raises(MemvisorError, match="not pinned"):
        pins.package("y")


# --- modules ------------------------------------------------------------------------------------------------

MODULES_DEP = """\
kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko kernel/lib/crc16.ko
kernel/fs/jbd2/jbd2.ko:
kernel/fs/mbcache.ko:
kernel/lib/crc16.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/misc/pvpanic/pvpanic-mmio.ko: kernel/drivers/misc/pvpanic/pvpanic.ko
kernel/drivers/misc/pvpanic/pvpanic.ko:
"""


def _moddir(tmp_path: Path) -> Path:
    moddir = tmp_path / "lib" / "modules" / "6.1.0-1-amd64"
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_text(MODULES_DEP)
    (moddir / "modules.builtin").write_text("kernel/drivers/dax/dax.ko\n")
    return moddir


def test_module_names_and_dep_parsing() -> None:
    assert module_name("kernel/arch/x86/kvm/kvm-amd.ko") == "kvm_amd"
    assert module_name("kernel/fs/ext4/ext4.ko.xz") == "ext4"
    deps = parse_modules_dep(MODULES_DEP)
    assert deps["kernel/fs/jbd2/jbd2.ko"] == []
    assert len(deps["kernel/fs/ext4/ext4.ko"]) == 3


def test_closure_puts_dependencies_first(tmp_path: Path) -> None:
    modules = ModuleSet(_moddir(tmp_path))
    order = modules.closure(["virtio_mmio", "ext4", "dax"], optional=["pvpanic_mmio", "crc32c_intel"])
    assert set(order) == set(parse_modules_dep(MODULES_DEP))
    for path, deps in parse_modules_dep(MODULES_DEP).items():
        assert all(order.index(dep) < order.index(path) for dep in deps)
    assert modules.loadable_names(["ext4", "dax", "pvpanic-mmio"]) == ["ext4", "pvpanic_mmio"]


def test_missing_required_module_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MemvisorError, match="kernel module virtio_mem is neither"):
        ModuleSet(_moddir(tmp_path)).closure(["virtio_mem"])


# --- ELF ----------------------------------------------------------------------------------------------------


def test_needed_libraries_of_a_dynamic_and_a_static_program(tmp_path: Path) -> None:
    assert "libc.so.6" in elf.needed_libraries(Path(os.path.realpath("/bin/ls")))
    if Path("/bin/busybox").exists():
        assert elf.needed_libraries(Path("/bin/busybox")) == []
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(elf.ElfError):
        elf.needed_libraries(script)


def test_init_template_has_both_module_placeholders() -> None:
    text = image.INIT_TEMPLATE.read_text()
    assert "@MODULES@" in text and "@OPTIONAL_MODULES@" in text
    assert "oom_score_adj" in text and "poweroff -f" in text


# --- moving the pins and the CLI ----------------------------------------------------------------------------

FAKE_APT_CACHE = r"""#!/bin/sh
if [ "$1" = search ]; then
    echo "linux-image-6.1.0-9-amd64 - Linux 6.1 for 64-bit PCs (signed)"
    echo "linux-image-6.1.0-12-amd64 - Linux 6.1 for 64-bit PCs (signed)"
    echo "linux-image-6.1.0-12-amd64-dbg - Debug symbols"
    echo "linux-image-6.1.0-12-cloud-amd64 - Linux 6.1 for x86-64 cloud (signed)"
    echo "linux-image-6.1.0-12-rt-amd64 - Linux 6.1 PREEMPT_RT"
    exit 0
fi
name=$3
printf 'Package: %s\nVersion: 9.%s-1\nSHA256: %s\n\n' "$name" "${#name}" \
    "$(printf %s "$name" | sha256sum | cut -d' ' -f1)"
"""


def test_move_pins_takes_the_newest_kernel_and_reports_old_and_new(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "apt-cache").write_text(FAKE_APT_CACHE)
    (tools / "apt-cache").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:/usr/bin:/bin")
    path = tmp_path / "pins.json"
    shutil.copyfile(packages.PINS_PATH, path)
    before = packages.load_pins(path)
    changes = packages.move_pins(["cloud"], path=path)
    after = packages.load_pins(path)
    assert changes == [
        ("kernel cloud", f"{before.kernels['cloud'].package} {before.kernels['cloud'].version}",
         "linux-image-6.1.0-12-cloud-amd64 9.32-1"),
    ]  # fmt: skip
    assert after.kernels["default"] == before.kernels["default"]
    assert after.packages == before.packages
    packages.move_pins(None, path=path)
    moved = packages.load_pins(path)
    assert moved.kernel("default").package == "linux-image-6.1.0-12-amd64"
    expected_sha = hashlib.sha256(b"libc6").hexdigest()
    assert moved.package("libc6") == Pin("libc6", "9.5-1", expected_sha)


def test_cli_image_path_in_the_lab_without_image_exits_125(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from memvisor.guest import cli

    monkeypatch.setenv("MEMVISOR_CACHE", str(tmp_path))
    monkeypatch.setenv("MEMVISOR_IN_LAB", "1")
    assert cli.main(["image", "path", "--flavour", "cloud"]) == 125
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "memvisor image build --flavour cloud" in err
    folder = _fake_image(tmp_path, "cloud")
    assert cli.main(["image", "path", "--flavour", "cloud"]) == 0
    assert capsys.readouterr().out.split() == [str(folder / "vmlinuz"), str(folder / "initrd.img")]
