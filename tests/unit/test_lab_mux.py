"""The lab's frame protocol: encoding, decoding whatever the chunking, and rejecting corrupt streams."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memvisor.lab.mux import (
    HEADER,
    MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    Kind,
    MuxError,
    StartRequest,
    data_frames,
    int_frame,
)

frames = st.builds(
    Frame,
    st.integers(min_value=0, max_value=2**32 - 1),
    st.sampled_from(list(Kind)),
    st.binary(max_size=300),
)


@given(st.lists(frames, max_size=20), st.lists(st.integers(min_value=1, max_value=50), min_size=1))
def test_frames_survive_any_chunking(sent: list[Frame], cuts: list[int]) -> None:
    stream = b"".join(frame.encode() for frame in sent)
    decoder = FrameDecoder()
    received: list[Frame] = []
    offset = 0
    index = 0
    while offset < len(stream):
        size = cuts[index % len(cuts)]
        received += decoder.feed(stream[offset : offset + size])
        offset += size
        index += 1
    assert received == sent
    assert decoder.pending == 0


def test_header_layout_is_network_order() -> None:
    assert Frame(0x01020304, Kind.DATA, b"xy").encode() == b"\x01\x02\x03\x04\x03\x00\x00\x00\x02xy"
    assert HEADER.size == 9


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(MuxError, match="unknown frame kind 99"):
        FrameDecoder().feed(HEADER.pack(1, 99, 0))


def test_oversized_length_is_rejected_before_buffering() -> None:
    with pytest.raises(MuxError, match="corrupt"):
        FrameDecoder().feed(HEADER.pack(1, Kind.DATA, MAX_PAYLOAD + 1))


def test_encoding_refuses_oversized_payload() -> None:
    with pytest.raises(ValueError):
        Frame(1, Kind.DATA, bytes(MAX_PAYLOAD + 1)).encode()


def test_data_frames_split_large_payloads() -> None:
    data = bytes(range(256)) * ((2 * MAX_PAYLOAD + 100) // 256 + 1)
    parts = data_frames(7, data)
    assert [len(part.payload) for part in parts][:2] == [MAX_PAYLOAD, MAX_PAYLOAD]
    assert b"".join(part.payload for part in parts) == data
    assert all(part.channel == 7 and part.kind is Kind.DATA for part in parts)
    assert data_frames(7, b"") == []


@given(st.integers(min_value=-(2**31), max_value=2**31 - 1))
def test_integer_payloads_round_trip(value: int) -> None:
    assert int_frame(0, Kind.EXIT, value).integer() == value


def test_integer_payload_of_wrong_size_is_an_error() -> None:
    with pytest.raises(MuxError, match="EXIT"):
        Frame(0, Kind.EXIT, b"\x00").integer()


def test_start_request_round_trip() -> None:
    request = StartRequest(
        argv=["sh", "-c", "echo é"],
        cwd="/work",
        env={"A": "1"},
        shares=[("rw0", "/tmp/x")],
        forwards=["/tmp/x/q.sock"],
        stdin=True,
    )
    decoded = StartRequest.decode(request.encode())
    assert decoded == request
    assert decoded.shares == [("rw0", "/tmp/x")]
    assert decoded.stdin is True


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[]",
        b'{"argv": []}',
        b'{"argv": [], "cwd": "/", "env": {}, "shares": [], "forwards": [], "stdin": false}',
    ],
)
def test_malformed_start_requests_are_rejected(payload: bytes) -> None:
    with pytest.raises(MuxError):
        StartRequest.decode(payload)
