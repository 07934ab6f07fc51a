"""The CLI verbs and the synchronous client, against a QmpServer over FakeMachine, plus their pure helpers."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memvisor.control.cli_verbs import (
    VERBS,
    human_size,
    parse_key_values,
    register,
    split_exec_words,
    stats_table,
)
from memvisor.control.client import QmpCommandError, QmpConnection
from memvisor.control.fake import FakeMachine
from memvisor.control.machine_api import guest_stats_dict
from memvisor.control.server import QmpServer
from memvisor.errors import MemvisorError, UsageError
from memvisor.units import parse_size

GiB = 1 << 30
MiB = 1 << 20


@pytest.fixture
def machine() -> FakeMachine:
    return FakeMachine()


@pytest.fixture
def sock_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="qmpcli-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sock(sock_dir: str, machine: FakeMachine) -> Iterator[str]:
    with QmpServer(os.path.join(sock_dir, "qmp.sock"), machine) as srv:
        yield srv.path


# --- helpers ---------------------------------------------------------------------------------------------------


def test_parse_key_values_json_where_possible() -> None:
    args = parse_key_values(
        ["path=vm0", "value=1073741824", "flag=true", 'list=["oob"]', "x=", "eq=a=b", "f=1.5"]
    )
    assert args == {
        "path": "vm0",
        "value": 1073741824,
        "flag": True,
        "list": ["oob"],
        "x": "",
        "eq": "a=b",
        "f": 1.5,
    }
    assert parse_key_values(['s="42"']) == {"s": "42"}  # a JSON string stays a string


@pytest.mark.parametrize("bad", [["novalue"], ["=3"], ["a=1", "a=2"]])
def test_parse_key_values_rejects(bad: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_key_values(bad)


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0"), (1023, "1023"), (512 * MiB, "512M"), (4 * GiB, "4G"), (1536 * MiB, "1536M"), (1000 * 1000 * 1000, "953.7M"),
     (GiB + 1, "1.0G"), (1025, "1.0K"), (3 * (1 << 40) + (1 << 39), "3584G")],
)  # fmt: skip
def test_human_size(size: int, text: str) -> None:
    assert human_size(size) == text


@given(st.integers(min_value=0, max_value=1 << 62))
def test_human_size_exact_forms_parse_back(size: int) -> None:
    text = human_size(size)
    if "." not in text:
        assert parse_size(text) == size
    else:
        value, unit = float(text[:-1]), {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[text[-1]]
        assert abs(value * unit - size) <= 0.05 * unit + 1


def test_stats_table_formats_sizes_counts_and_missing() -> None:
    stats = guest_stats_dict({0: 0, 2: 17, 4: 300 * MiB, 5: GiB, 6: 1000 * 1000 * 1000}, last_update=0)
    table = stats_table(stats, polling_interval=2).splitlines()
    rows = dict(line.split(None, 1) for line in table)
    assert rows["statistic"] == "value"
    assert rows["swap-in"] == "0" and rows["major-faults"] == "17"
    assert (
        rows["free-memory"] == "300M"
        and rows["total-memory"] == "1G"
        and rows["available-memory"] == "953.7M"
    )
    assert rows["minor-faults"] == "-" and rows["htlb-pgfail"] == "-"
    assert rows["last-update"] == "never" and rows["polling-interval"] == "2s"
    assert len({len(line) - len(line.split(None, 1)[1]) for line in table}) == 1  # one aligned value column


def test_split_exec_words() -> None:
    assert split_exec_words(["--", "echo", "a b"], 30) == (30, "echo 'a b'")
    assert split_exec_words(["--timeout", "5", "--", "ls", "--", "-l"], 30) == (5, "ls -- -l")
    assert split_exec_words(["--timeout=2.5", "--", "echo $HOME"], 30) == (2.5, "echo $HOME")
    for bad in ([], ["--"], ["--timeout", "x", "--", "ls"], ["--timeout", "0", "--", "ls"]):
        with pytest.raises(UsageError):
            split_exec_words(bad, 30)


# --- the client --------------------------------------------------------------------------------------------------


def test_client_errors_name_the_fix(sock_dir: str) -> None:
    missing = os.path.join(sock_dir, "missing.sock")
    with pytest.raises(MemvisorError, match="no QMP socket at .*--qmp"):
        QmpConnection(missing)
    dead = os.path.join(sock_dir, "dead.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(dead)
    with pytest.raises(MemvisorError, match="nothing listens"):
        QmpConnection(dead)
    plain = os.path.join(sock_dir, "plain")
    open(plain, "w").close()
    with pytest.raises(MemvisorError):
        QmpConnection(plain)


def test_client_against_a_non_qmp_server(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "echo.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen()
        import threading

        def serve() -> None:
            conn, _ = listener.accept()
            conn.sendall(b'{"hello": 1}\n')
            conn.close()

        threading.Thread(target=serve, daemon=True).start()
        with pytest.raises(MemvisorError, match="does not speak QMP"):
            QmpConnection(path, timeout=5)


def test_client_execute_and_events(sock: str, machine: FakeMachine) -> None:
    with QmpConnection(sock) as qmp:
        assert qmp.greeting["QMP"]["version"]["qemu"]["major"] == 7
        qmp.execute("balloon", {"value": 512 * MiB})
        assert qmp.execute("query-balloon") == {"actual": 512 * MiB}
        assert [event["event"] for event in qmp.events] == ["BALLOON_CHANGE"]
        with pytest.raises(QmpCommandError, match="query-commands") as err:
            qmp.execute("no-such")
        assert err.value.error_class == "CommandNotFound"


# --- the verbs -------------------------------------------------------------------------------------------------


def test_qmp_verb_prints_the_reply(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert VERBS["qmp"]([sock, "qom-get", "path=vm0", "property=block-size"]) == 0
    assert json.loads(capsys.readouterr().out) == {"return": 2 * MiB}
    with pytest.raises(QmpCommandError, match="Parameter 'bogus' is unexpected"):
        VERBS["qmp"]([sock, "query-status", "bogus=1"])


def test_balloon_verb(sock: str, machine: FakeMachine, capsys: pytest.CaptureFixture[str]) -> None:
    assert VERBS["balloon"]([sock, "512M", "--wait", "1"]) == 0
    assert machine.fake_balloon.actual_bytes() == 512 * MiB
    assert capsys.readouterr().out.strip() == "balloon: target 512M, actual 512M"
    for bad in ("0", "lots", "5X"):
        with pytest.raises(UsageError):
            VERBS["balloon"]([sock, bad])
    assert machine.fake_balloon.actual_bytes() == 512 * MiB


def test_balloon_verb_wait_times_out(sock: str, machine: FakeMachine) -> None:
    machine.fake_balloon.set_target_bytes = lambda target: None  # type: ignore[method-assign]  # a stuck guest
    with pytest.raises(MemvisorError, match="wait longer"):
        VERBS["balloon"]([sock, "256M", "--wait", "0.3"])


def test_mem_verb(sock: str, machine: FakeMachine, capsys: pytest.CaptureFixture[str]) -> None:
    assert VERBS["mem"]([sock, "vm0", "--requested-size", "1G"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("vm0: requested-size 1G, size 1G, max-size 4G, block-size 2M")
    with pytest.raises(QmpCommandError, match="multiples of 'block-size'"):
        VERBS["mem"]([sock, "vm0", "--requested-size", "3M"])
    with pytest.raises(MemvisorError, match="no virtio-mem device 'pm0'"):
        VERBS["mem"]([sock, "pm0"])


def test_info_verb(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert VERBS["info"]([sock, "memory-devices"]) == 0
    out = capsys.readouterr().out
    assert out.startswith('Memory device [virtio-mem]: "vm0"\n  memaddr: 0x100000000\n')
    assert "\r" not in out
    VERBS["info"]([sock, "balloon"])
    assert capsys.readouterr().out == "balloon: actual=1024\n"
    VERBS["info"]([sock, "status"])
    assert capsys.readouterr().out == "VM status: running\n"


def test_exec_verb_passes_output_and_status(sock: str, capfd: pytest.CaptureFixture[str]) -> None:
    assert VERBS["exec"]([sock, "--", "sh", "-c", "echo out; echo err >&2; exit 4"]) == 4
    out, err = capfd.readouterr()
    assert out == "out\n" and err == "err\n"
    with pytest.raises(QmpCommandError, match="did not finish"):
        VERBS["exec"]([sock, "--timeout", "0.2", "--", "sleep 3"])


def test_stats_verb(sock: str, machine: FakeMachine, capsys: pytest.CaptureFixture[str]) -> None:
    machine.fake_balloon.stats = {4: 300 * MiB}
    assert VERBS["stats"]([sock]) == 0
    out = capsys.readouterr().out
    assert "free-memory" in out and "300M" in out and "polling is off" in out
    assert VERBS["stats"]([sock, "--poll", "3"]) == 0
    assert machine.fake_balloon.stats_polling_interval() == 3
    assert "polling is off" not in capsys.readouterr().out


def test_stats_verb_without_balloon(sock_dir: str) -> None:
    with (
        QmpServer(os.path.join(sock_dir, "b.sock"), FakeMachine(balloon=False)) as srv,
        pytest.raises(MemvisorError, match="no balloon"),
    ):
        VERBS["stats"]([srv.path])


def test_register_adds_every_verb_with_a_handler(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="memvisor")
    register(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(["info", sock, "balloon"])
    assert args.handler(args) == 0
    assert capsys.readouterr().out == "balloon: actual=1024\n"
    for verb in ("qmp", "exec", "balloon", "mem", "info", "stats"):
        with pytest.raises(SystemExit):
            parser.parse_args([verb, "--help"])


def test_memvisor_main_runs_the_verbs(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    from memvisor.cli.main import main

    assert main(["info", sock, "status"]) == 0
    assert capsys.readouterr().out == "VM status: running\n"
    assert main(["balloon", sock + ".missing", "1G"]) == 125
    assert "no QMP socket" in capsys.readouterr().err
