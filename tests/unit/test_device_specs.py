"""`--device` options in QEMU's words (memvisor.vmm.device_specs): every property, defaults, bad values."""

from pathlib import Path

import pytest

from memvisor.errors import UsageError
from memvisor.vmm.device_specs import (
    DEVICE_PROPERTIES,
    REQUIRED,
    files_named,
    parse_device_spec,
    parse_device_specs,
)

GIB, MIB = 1 << 30, 1 << 20


def test_balloon_defaults() -> None:
    spec = parse_device_spec("virtio-balloon")
    assert spec.type == "virtio-balloon" and spec.id == "balloon0"
    assert spec.properties == {
        "id": "balloon0",
        "deflate-on-oom": False,
        "free-page-reporting": False,
        "free-page-hint": False,
        "guest-stats-polling-interval": 0,
    }


def test_balloon_every_property() -> None:
    spec = parse_device_spec(
        "virtio-balloon,id=b1,deflate-on-oom=on,free-page-reporting=yes,free-page-hint=true,"
        "guest-stats-polling-interval=5"
    )
    assert spec.properties == {
        "id": "b1",
        "deflate-on-oom": True,
        "free-page-reporting": True,
        "free-page-hint": True,
        "guest-stats-polling-interval": 5,
    }


@pytest.mark.parametrize(("text", "value"), [("on", True), ("yes", True), ("true", True),
                                             ("off", False), ("no", False), ("false", False)])  # fmt: skip
def test_booleans(text: str, value: bool) -> None:
    assert parse_device_spec(f"virtio-balloon,deflate-on-oom={text}").properties["deflate-on-oom"] is value
    assert parse_device_spec(f"virtio-pmem,file=/x,readonly={text}").properties["readonly"] is value


@pytest.mark.parametrize("text", ["1", "0", "maybe", "", "ON "])
def test_bad_boolean(text: str) -> None:
    with pytest.raises(UsageError, match="not a boolean: write on or off"):
        parse_device_spec(f"virtio-balloon,free-page-hint={text}")


def test_virtio_mem_every_property() -> None:
    spec = parse_device_spec(
        "virtio-mem,id=mem1,max-size=4G,requested-size=1536M,block-size=4M,node=1,prealloc=on,"
        "unplugged-inaccessible=off"
    )
    assert spec.properties == {
        "id": "mem1",
        "max-size": 4 * GIB,
        "requested-size": 1536 * MIB,
        "block-size": 4 * MIB,
        "node": 1,
        "prealloc": True,
        "unplugged-inaccessible": False,
    }


def test_virtio_mem_defaults() -> None:
    spec = parse_device_spec("virtio-mem,max-size=8G")
    assert spec.properties == {
        "id": "vm0",
        "max-size": 8 * GIB,
        "requested-size": 0,
        "block-size": 2 * MIB,
        "node": 0,
        "prealloc": False,
        "unplugged-inaccessible": True,
    }


@pytest.mark.parametrize(("text", "size"), [("4G", 4 * GIB), ("4096M", 4 * GIB), ("1T", 1 << 40),
                                            ("2147483648", 2 * GIB), ("512MiB", 512 * MIB), ("64k", 64 << 10)])  # fmt: skip
def test_sizes(text: str, size: int) -> None:
    assert parse_device_spec(f"virtio-mem,max-size={text}").properties["max-size"] == size


@pytest.mark.parametrize("text", ["4Q", "-1G", "1.5G", "", "G"])
def test_bad_size(text: str) -> None:
    with pytest.raises(UsageError, match="virtio-mem max-size .* is not a size"):
        parse_device_spec(f"virtio-mem,max-size={text}")


def test_virtio_pmem_every_property() -> None:
    spec = parse_device_spec("virtio-pmem,id=pm1,file=/var/tmp/a=b.img,size=1G,readonly=on")
    assert spec.properties == {"id": "pm1", "file": "/var/tmp/a=b.img", "size": GIB, "readonly": True}
    assert parse_device_spec("virtio-pmem,file=x.img").properties == {
        "id": "pm0",
        "file": "x.img",
        "size": 0,
        "readonly": False,
    }


@pytest.mark.parametrize(
    ("kind", "needed"), sorted((kind, name) for kind, names in REQUIRED.items() for name in names)
)
def test_required_properties(kind: str, needed: str) -> None:
    with pytest.raises(UsageError, match=f"--device {kind} needs {needed}=..., e.g. {kind},{needed}="):
        parse_device_spec(kind)


def test_unknown_type_lists_the_known_ones() -> None:
    with pytest.raises(UsageError) as caught:
        parse_device_spec("virtio-net,id=n0")
    message = str(caught.value)
    assert "'virtio-net'" in message
    assert all(kind in message for kind in DEVICE_PROPERTIES)


def test_unknown_property_lists_the_known_ones() -> None:
    with pytest.raises(UsageError) as caught:
        parse_device_spec("virtio-balloon,bogus=1")
    message = str(caught.value)
    assert "'bogus'" in message
    assert all(name in message for name in DEVICE_PROPERTIES["virtio-balloon"])


def test_property_without_a_value() -> None:
    with pytest.raises(UsageError, match="'deflate-on-oom' is not name=value"):
        parse_device_spec("virtio-balloon,deflate-on-oom")


def test_empty_string_property() -> None:
    with pytest.raises(UsageError, match="virtio-balloon id is empty"):
        parse_device_spec("virtio-balloon,id=")


@pytest.mark.parametrize("text", ["", "x", "-3", "1.5", "5s", "²", "٣"])
def test_bad_whole_numbers(text: str) -> None:
    with pytest.raises(UsageError, match="is not a whole number"):
        parse_device_spec(f"virtio-balloon,guest-stats-polling-interval={text}")


def test_empty_items_are_skipped_and_later_values_win() -> None:
    spec = parse_device_spec("virtio-balloon,,id=a,,id=b,")
    assert spec.id == "b"


def test_several_devices() -> None:
    specs = parse_device_specs(
        [
            "virtio-balloon",
            "virtio-mem,id=m0,max-size=2G",
            "virtio-mem,id=m1,max-size=2G,node=1",
            "virtio-pmem,file=a",
        ]
    )
    assert [(spec.type, spec.id) for spec in specs] == [
        ("virtio-balloon", "balloon0"),
        ("virtio-mem", "m0"),
        ("virtio-mem", "m1"),
        ("virtio-pmem", "pm0"),
    ]
    assert parse_device_specs([]) == []


def test_duplicate_ids() -> None:
    with pytest.raises(UsageError, match="two devices have id 'vm0': give each its own id="):
        parse_device_specs(["virtio-mem,max-size=1G", "virtio-mem,max-size=2G"])
    with pytest.raises(UsageError, match="two devices have id 'x'"):
        parse_device_specs(["virtio-balloon,id=x", "virtio-pmem,id=x,file=f"])


def test_two_balloons() -> None:
    with pytest.raises(UsageError, match="only one virtio-balloon"):
        parse_device_specs(["virtio-balloon,id=b0", "virtio-balloon,id=b1"])
    with pytest.raises(UsageError):  # with the default ids they clash on the id first
        parse_device_specs(["virtio-balloon", "virtio-balloon"])


def test_files_named() -> None:
    texts = ["virtio-balloon", "virtio-pmem,id=a,file=/tmp/one.img", "virtio-pmem,id=b,file=rel/two.img"]
    assert files_named(texts) == [Path("/tmp/one.img"), Path("rel/two.img")]
    with pytest.raises(UsageError):
        files_named(["virtio-pmem"])
