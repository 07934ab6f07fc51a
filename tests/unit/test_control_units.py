"""The control plane's pure parts: the JSON stream splitter, argument checks, QOM paths, HMP text, events."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memvisor.control import commands, events, hmp, qom
from memvisor.control.args import Arg, Kind, check_args
from memvisor.control.errors import QmpError
from memvisor.control.fake import FakeMachine
from memvisor.control.stream import JsonSplitter, StreamLimitError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=4), max_size=5), st.data())
def test_splitter_recovers_objects_however_the_bytes_are_cut(
    objects: list[dict[str, Any]], data: st.DataObject
) -> None:
    stream = b"".join(
        json.dumps(obj).encode() + data.draw(st.sampled_from([b"", b"\n", b" \r\n"])) for obj in objects
    )
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    splitter = JsonSplitter()
    out: list[bytes] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        out.extend(splitter.feed(stream[start:cut]))
        start = cut
    assert [json.loads(chunk) for chunk in out] == objects
    assert splitter.pending == 0


def test_splitter_strings_with_brackets_and_escapes() -> None:
    splitter = JsonSplitter()
    text = rb'{"a": "}{\"]", "b": ["\\", "{"]}'
    assert splitter.feed(text + text) == [text, text]


def test_splitter_returns_bare_tokens_and_stray_closers() -> None:
    splitter = JsonSplitter()
    assert splitter.feed(b'42 true "s" } {"x":1}') == [b"42", b"true", b'"s"', b"}", b'{"x":1}']


def test_splitter_limits() -> None:
    with pytest.raises(StreamLimitError):
        JsonSplitter(max_bytes=100).feed(b'{"a": "' + b"x" * 200)
    with pytest.raises(StreamLimitError):
        JsonSplitter(max_depth=10).feed(b"[" * 11)
    assert JsonSplitter(max_depth=10).feed(b"[" * 10 + b"]" * 10) == [b"[" * 10 + b"]" * 10]


SPEC = (
    Arg("name", Kind.STR),
    Arg("size", Kind.UINT),
    Arg("n", Kind.INT, required=False),
    Arg("t", Kind.NUMBER, False),
)


@pytest.mark.parametrize(
    ("arguments", "desc"),
    [
        ({}, "Parameter 'name' is missing"),
        ({"name": "a"}, "Parameter 'size' is missing"),
        ({"name": 1, "size": 1}, "Invalid parameter type for 'name', expected: string"),
        ({"name": "a", "size": -1}, "Invalid parameter type for 'size', expected: integer"),
        ({"name": "a", "size": 1 << 64}, "Invalid parameter type for 'size', expected: integer"),
        ({"name": "a", "size": True}, "Invalid parameter type for 'size', expected: integer"),
        ({"name": "a", "size": 1.0}, "Invalid parameter type for 'size', expected: integer"),
        ({"name": "a", "size": 1, "n": 1 << 63}, "Invalid parameter type for 'n', expected: integer"),
        ({"name": "a", "size": 1, "t": "1"}, "Invalid parameter type for 't', expected: number"),
        ({"name": "a", "size": 1, "zzz": 0}, "Parameter 'zzz' is unexpected"),
    ],
)
def test_check_args_errors(arguments: dict[str, Any], desc: str) -> None:
    with pytest.raises(QmpError) as err:
        check_args(SPEC, arguments)
    assert err.value.to_json() == {"class": "GenericError", "desc": desc}


def test_check_args_accepts() -> None:
    args = {"name": "a", "size": (1 << 64) - 1, "n": -(1 << 63), "t": 0.5}
    assert check_args(SPEC, args) == args


def test_qom_paths_resolve_like_qemu() -> None:
    tree = qom.build_tree(FakeMachine())
    assert qom.resolve(tree, "vm0").path == "/machine/peripheral/vm0"
    assert qom.resolve(tree, "/machine/peripheral/vm0") is qom.resolve(tree, "peripheral/vm0")
    assert qom.resolve(tree, "/").path == "/"
    for bad in ("", "nosuch", "/machine/nosuch", "/vm0"):
        with pytest.raises(QmpError) as err:
            qom.resolve(tree, bad)
        assert err.value.error_class == "DeviceNotFound"
    assert {"name": "vm0", "type": "child<virtio-mem>"} in qom.qom_list(
        qom.resolve(tree, "/machine/peripheral")
    )
    assert qom.qom_get(qom.resolve(tree, "/machine"), "peripheral") == "/machine/peripheral"


def test_hmp_error_and_balloon_commands() -> None:
    machine = FakeMachine(balloon=False)
    ctx = commands.Context(machine, lambda name, data: None)

    def run(line: str) -> str:
        return hmp.run(line, lambda name, args: commands.execute(ctx, name, args))

    assert run("info balloon") == "Error: No balloon device has been activated\r\n"
    assert run("") == ""
    assert run("stop") == "" and machine.calls == ["stop"]
    assert run("balloon x") == "Error: balloon takes one argument, the target size in MiB\r\n"
    with_balloon = FakeMachine()
    ctx = commands.Context(with_balloon, lambda name, data: None)
    assert run("balloon 300") == ""
    assert with_balloon.fake_balloon.actual_bytes() == 300 << 20


def test_event_message_shape() -> None:
    message = events.event_message(*events.balloon_change(5), now=1700000000.25)
    assert message == {
        "event": "BALLOON_CHANGE",
        "data": {"actual": 5},
        "timestamp": {"seconds": 1700000000, "microseconds": 250000},
    }
    assert "data" not in events.event_message(*events.stop())
