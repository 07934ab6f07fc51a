"""Shared by every test folder: where nothing may skip, a skip is a failure.

CI (`CI` set, as CI services and .ci/run do) and the lab (`MEMVISOR_IN_LAB=1`, set by its agent) have every
tool and image installed by scripts/setup, so a test that skips there (a guest test without KVM, a header
comparison without gcc, a lab test without QEMU) would hide what it checks: it fails instead, with the skip's
reason. A test whose skip is right even there (it cannot run as root, say) carries `@pytest.mark.may_skip`.
Elsewhere skips stay skips, and `-rs` (pyproject addopts) prints every reason.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest


def strict_skips(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """True in CI and in the lab, where a skip must fail."""
    ci = environ.get("CI", "").strip().lower()
    return environ.get("MEMVISOR_IN_LAB") == "1" or ci not in ("", "0", "false", "no")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and strict_skips()) or hasattr(report, "wasxfail"):
        return
    if item.get_closest_marker("may_skip") is not None:
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    report.outcome = "failed"
    report.longrepr = (
        f"{item.nodeid} skipped where nothing may skip (CI or MEMVISOR_IN_LAB=1 is set): {reason}\n"
        "install what it needs (scripts/setup) or run it where it can run"
    )
