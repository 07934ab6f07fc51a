"""Outputs built from each round: Prometheus metrics over HTTP and a PNG plot of a run.

    server = MetricsServer("127.0.0.1", 9101); manager.listeners.append(server.update); server.start()
    plot(manager.history, "run.png")

The metrics are the Prometheus text exposition format 0.0.4 (one `# TYPE` line per family, then samples), served
at /metrics by a small thread of the standard library's HTTP server: no client library needed.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from memvisor.errors import UsageError
from memvisor.manager.loop import RoundRecord
from memvisor.manager.policy import Decision

PER_VM = {
    "actual": ("memvisor_manager_vm_size_bytes", "guest memory now: balloon actual plus plugged virtio-mem"),
    "plan": ("memvisor_manager_vm_target_bytes", "planned guest memory"),
    "host": ("memvisor_manager_vm_host_bytes", "what the host holds for the VM"),
    "guest-available": ("memvisor_manager_vm_guest_available_bytes", "the guest's available memory"),
    "floor": ("memvisor_manager_vm_floor_bytes", "the VM's floor"),
}


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def exposition(record: RoundRecord, decision: Decision, events: Counter[str]) -> str:
    lines = [
        "# HELP memvisor_manager_budget_bytes the effective host memory budget this round",
        "# TYPE memvisor_manager_budget_bytes gauge",
        f"memvisor_manager_budget_bytes {record.budget}",
        "# HELP memvisor_manager_planned_bytes the sum of the VMs' planned memory",
        "# TYPE memvisor_manager_planned_bytes gauge",
        f"memvisor_manager_planned_bytes {decision.total}",
        "# HELP memvisor_manager_floors_fit 1 if the budget holds every VM's floor",
        "# TYPE memvisor_manager_floors_fit gauge",
        f"memvisor_manager_floors_fit {int(decision.floors_fit)}",
    ]
    if record.host_total is not None:
        lines += ["# TYPE memvisor_manager_host_bytes gauge", f"memvisor_manager_host_bytes {record.host_total}"]
    for key, (name, help_text) in PER_VM.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        key_name = "size" if key == "actual" else key
        for vm, values in record.vms.items():
            if values.get(key_name) is not None:
                lines.append(f'{name}{{vm="{_label(vm)}"}} {values[key_name]}')
    lines += ["# HELP memvisor_manager_events_total events by kind", "# TYPE memvisor_manager_events_total counter"]
    lines += [f'memvisor_manager_events_total{{kind="{_label(kind)}"}} {count}' for kind, count in sorted(events.items())]
    return "\n".join(lines) + "\n"


class MetricsServer:
    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise UsageError(f"--metrics {address!r} is not HOST:PORT: write e.g. 127.0.0.1:9101")
        self._text = "# no round yet\n"
        self._events: Counter[str] = Counter()
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404, "the metrics are at /metrics")
                    return
                with outer._lock:
                    body = outer._text.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        try:
            self.httpd = ThreadingHTTPServer((host, int(port)), Handler)
        except OSError as err:
            raise UsageError(f"cannot serve metrics on {address}: {err.strerror}; pick another port") from None
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self.thread.start()

    def update(self, record: RoundRecord, decision: Decision) -> None:
        with self._lock:
            self._events.update(event.kind for event in decision.events)
            self._text = exposition(record, decision, self._events)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def plot(history: Sequence[RoundRecord], path: str) -> None:
    """Host memory of the VMs against the budget, and each VM's size, target and guest used memory, over time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install matplotlib (scripts/setup installs it)") from None
    if not history:
        raise UsageError("nothing to plot: the manager ran no round")
    t0 = history[0].time
    times = [r.time - t0 for r in history]
    mib = float(1 << 20)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    top.plot(times, [r.budget / mib for r in history], "k--", label="budget")
    top.plot(times, [sum(v["plan"] for v in r.vms.values()) / mib for r in history], label="planned (sum)")
    top.plot(times, [(r.host_total or 0) / mib for r in history], label="host memory of the VMs")
    top.set_ylabel("MiB")
    top.legend(loc="best")
    names = sorted({name for r in history for name in r.vms})
    for name in names:
        size = [r.vms[name]["size"] / mib if name in r.vms else float("nan") for r in history]
        line = bottom.plot(times, size, label=f"{name} actual")[0]

        def used(r: RoundRecord, name: str = name) -> float:
            vm = r.vms.get(name)
            if vm is None or vm["guest-total"] is None or vm["guest-available"] is None:
                return float("nan")
            return float(vm["guest-total"] - vm["guest-available"]) / mib

        bottom.plot(times, [used(r) for r in history], ":", color=line.get_color(), label=f"{name} guest used")
    bottom.set_xlabel("seconds")
    bottom.set_ylabel("MiB")
    bottom.legend(loc="best", fontsize="small")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as err:
        raise UsageError(f"cannot write the plot {path}: {err.strerror}") from None
    finally:
        plt.close(fig)
