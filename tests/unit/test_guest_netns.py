"""tests/guest/netns.py, the network namespace pair of the migration's netns variant, and GuestVM's argv
wrappers: names, commands and their order, cleanup on every path (a fake `ip`), and, where this machine allows
it (root, network namespaces and veth), one real pair carrying TCP between its namespaces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.guest import netns
from tests.guest.netns import NetnsError, netns_pair, pair_for, tcp_table_listens, veth_diagnosis
from tests.guest.vm import wrapped_argv

IP = "/usr/sbin/ip"


class FakeIp:
    """Records every command; fails those containing `fail_on` (a word sequence) with NetnsError."""

    def __init__(self, *fail_on: list[str], stdout: str = "") -> None:
        self.commands: list[list[str]] = []
        self.fail_on = fail_on
        self.stdout = stdout

    def __call__(self, argv: list[str]) -> str:
        self.commands.append(argv)
        for words in self.fail_on:
            if any(argv[i : i + len(words)] == words for i in range(len(argv))):
                raise NetnsError(f"`{' '.join(argv)}` exited 2: RTNETLINK answers: Operation not supported")
        return self.stdout

    def deleted(self) -> list[str]:
        return [argv[3] for argv in self.commands if argv[:3] == ["ip", "netns", "delete"]]


def test_the_pair_is_named_by_pid_with_short_interface_names_in_one_slash_30() -> None:
    pair = pair_for(4194304)
    assert (pair.source.netns, pair.dest.netns) == ("mvmig-src-4194304", "mvmig-dst-4194304")
    assert pair_for(17).source.netns != pair.source.netns
    for side in (pair.source, pair.dest):
        assert len(side.interface) <= 15  # IFNAMSIZ - 1
    assert (pair.source.address, pair.dest.address) == ("10.213.0.1", "10.213.0.2")


def test_setup_makes_both_namespaces_then_the_veth_inside_them_then_addresses_and_links_up() -> None:
    fake = FakeIp()
    with netns_pair(fake, pid=42) as pair:
        made = list(fake.commands)
    src, dst = pair.source.netns, pair.dest.netns
    assert made[:3] == [
        ["ip", "netns", "add", src],
        ["ip", "netns", "add", dst],
        ["ip", "link", "add", "mvmig-src", "netns", src, "type", "veth", "peer", "name", "mvmig-dst", "netns", dst],
    ]  # fmt: skip
    assert ["ip", "-n", src, "addr", "add", "10.213.0.1/30", "dev", "mvmig-src"] in made
    assert ["ip", "-n", dst, "addr", "add", "10.213.0.2/30", "dev", "mvmig-dst"] in made
    for ns, interface in ((src, "mvmig-src"), (dst, "mvmig-dst")):
        assert ["ip", "-n", ns, "link", "set", "lo", "up"] in made
        assert ["ip", "-n", ns, "link", "set", interface, "up"] in made
    # Nothing is ever created in the caller's namespace: every later command names one of the two.
    assert all(src in argv or dst in argv for argv in made)
    assert fake.commands[len(made) :] == [["ip", "netns", "delete", dst], ["ip", "netns", "delete", src]]


def test_a_failed_veth_deletes_both_namespaces_and_says_what_is_missing() -> None:
    fake = FakeIp(["type", "veth"])
    expected = "cannot create the veth pair.*Operation not supported.*veth"
    with pytest.raises(NetnsError, match=expected) as caught, netns_pair(fake, pid=42):
        raise AssertionError("not reached")
    assert "LAB_MODULES" in str(caught.value) or "/sys/module/veth exists" in str(caught.value)
    assert fake.deleted() == ["mvmig-dst-42", "mvmig-src-42"]


def test_a_failed_second_namespace_deletes_only_the_first() -> None:
    fake = FakeIp(["netns", "add", "mvmig-dst-42"])
    expected = "cannot create the network namespace mvmig-dst-42.*/run/netns"
    with pytest.raises(NetnsError, match=expected), netns_pair(fake, pid=42):
        raise AssertionError("not reached")
    assert fake.deleted() == ["mvmig-src-42"]


def test_the_tests_own_error_wins_and_a_failed_deletion_is_noted_on_it() -> None:
    fake = FakeIp(["netns", "delete", "mvmig-dst-42"])
    with pytest.raises(ZeroDivisionError) as caught, netns_pair(fake, pid=42):
        raise ZeroDivisionError("the test failed")
    assert fake.deleted() == ["mvmig-dst-42", "mvmig-src-42"]  # the second deletion is still tried
    assert any("mvmig-dst-42" in note for note in caught.value.__notes__)


def test_a_failed_deletion_after_a_passing_body_is_an_error() -> None:
    fake = FakeIp(["netns", "delete", "mvmig-src-42"])
    with (
        pytest.raises(NetnsError, match="leftover network namespaces.*mvmig-src-42"),
        netns_pair(fake, pid=42),
    ):
        pass
    assert fake.deleted() == ["mvmig-dst-42", "mvmig-src-42"]


def test_side_reads_counters_and_listening_sockets_inside_its_namespace() -> None:
    link = [{"ifname": "mvmig-dst", "stats64": {"rx": {"bytes": 123, "packets": 1}, "tx": {"bytes": 45}}}]
    fake = FakeIp(stdout=json.dumps(link))
    side = pair_for(42, fake).dest
    assert side.byte_counts() == (123, 45)
    assert fake.commands[-1] == ["ip", "-n", "mvmig-dst-42", "-j", "-s", "link", "show", "dev", "mvmig-dst"]
    fake.stdout = TCP_TABLE
    assert side.listens(4444) and not side.listens(4445)
    assert fake.commands[-1] == ["ip", "netns", "exec", "mvmig-dst-42", "cat", "/proc/net/tcp"]


# /proc/net/tcp: 10.213.0.2:4444 (0x115C) listening (0A), 127.0.0.1:4445 (0x115D) established (01).
TCP_TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0200D50A:115C 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000 100 0 0 10 0
   1: 0100007F:115D 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000 20 4 30 10 -1
"""


def test_tcp_table_listens_only_for_listening_sockets_on_that_port() -> None:
    assert tcp_table_listens(TCP_TABLE, 4444)
    assert not tcp_table_listens(TCP_TABLE, 4445)  # established, not listening
    assert not tcp_table_listens(TCP_TABLE, 0x15C)  # a suffix of the port's hex is not the port
    assert not tcp_table_listens("", 4444)


def test_parse_byte_counts_reads_ip_json_stats64() -> None:
    text = ('[{"ifindex":3,"ifname":"a0","stats64":{"rx":{"bytes":7,"packets":1,"errors":0},'
            '"tx":{"bytes":9,"packets":2,"errors":0}}}]')  # fmt: skip
    assert netns.parse_byte_counts(text) == (7, 9)


def test_veth_diagnosis_names_the_missing_module_and_where_it_comes_from(tmp_path: Path) -> None:
    missing = veth_diagnosis(tmp_path / "veth", release="6.1.0-56-amd64")
    assert (
        "6.1.0-56-amd64 has no veth loaded" in missing and "LAB_MODULES" in missing and "init.sh" in missing
    )
    (tmp_path / "veth").mkdir()
    assert "lies elsewhere" in veth_diagnosis(tmp_path / "veth", release="6.1.0-56-amd64")


def test_wrapped_argv_runs_memvisor_in_the_namespace_and_joins_the_cgroup_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(netns, "ip_program", lambda: IP)
    memvisor = [sys.executable, "-m", "memvisor", "run"]
    assert wrapped_argv(memvisor) == memvisor
    assert wrapped_argv(memvisor, netns="mvmig-src-1") == [IP, "netns", "exec", "mvmig-src-1", *memvisor]
    cgroup = Path("/sys/fs/cgroup/test")
    joined = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', "/sys/fs/cgroup/test/cgroup.procs"]
    assert wrapped_argv(memvisor, cgroup=cgroup) == [*joined, *memvisor]
    assert wrapped_argv(memvisor, cgroup=cgroup, netns="mvmig-dst-1") == [
        *joined, IP, "netns", "exec", "mvmig-dst-1", *memvisor,
    ]  # fmt: skip


# --- a real pair, where this machine can make one --------------------------------------------------------------

SERVER = """
import socket, sys
server = socket.socket()
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen(1)
conn, _ = server.accept()
total = 0
while data := conn.recv(1 << 16):
    total += len(data)
print(total)
"""
CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as conn:
    conn.sendall(bytes(int(sys.argv[3])))
"""


def _namespaces_unavailable() -> str | None:
    """Why no real pair can be made here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    try:
        netns.ip_program()
    except NetnsError as error:
        return str(error)
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True, check=False)
    return None if probe.returncode == 0 else f"no network namespaces here: {probe.stderr.strip()}"


@pytest.mark.may_skip
def test_a_real_pair_carries_tcp_between_its_namespaces_and_leaves_nothing_behind() -> None:
    reason = _namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    port, size = 4444, 4 << 20
    with netns_pair() as pair:
        before_tx, before_rx = pair.source.byte_counts()[1], pair.dest.byte_counts()[0]
        server = subprocess.Popen([*netns.exec_prefix(pair.dest.netns), sys.executable, "-c", SERVER,
                                   pair.dest.address, str(port)], stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while not pair.dest.listens(port):
                assert time.monotonic() < deadline and server.poll() is None, "the server did not listen"
                time.sleep(0.05)
            subprocess.run([*netns.exec_prefix(pair.source.netns), sys.executable, "-c", CLIENT,
                            pair.dest.address, str(port), str(size)], check=True, timeout=30)  # fmt: skip
            out, _ = server.communicate(timeout=30)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
        assert int(out) == size
        assert pair.source.byte_counts()[1] - before_tx >= size
        assert pair.dest.byte_counts()[0] - before_rx >= size
        names = (pair.source.netns, pair.dest.netns)
    listed = netns.run_command(["ip", "netns", "list"])
    assert not any(name in listed for name in names), listed
