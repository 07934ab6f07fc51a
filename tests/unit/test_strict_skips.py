"""tests/conftest.py: in CI and in the lab a skip fails (naming its reason); elsewhere it stays a skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import strict_skips

REPO = Path(__file__).resolve().parents[2]
SAMPLE = '''
import pytest

def test_needs_a_tool():
    pytest.skip("the tool is missing")

@pytest.mark.may_skip
@pytest.mark.skipif(True, reason="right to skip even in CI")
def test_allowed():
    pass

@pytest.mark.xfail(strict=True, reason="a known difference")
def test_known_difference():
    assert False

def test_plain():
    pass
'''


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    environ = {k: v for k, v in os.environ.items() if k not in ("CI", "MEMVISOR_IN_LAB")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:randomly", "-p", "no:cacheprovider",
         "-rsx", "-q", "-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=REPO, env={**environ, **env}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize("env", [{"CI": "true"}, {"MEMVISOR_IN_LAB": "1"}])
def test_a_skip_fails_in_ci_and_in_the_lab(tmp_path: Path, env: dict[str, str]) -> None:
    result = _run(tmp_path, **env)
    assert result.returncode == 1, result.stdout
    assert "1 failed, 1 passed, 1 skipped, 1 xfailed" in result.stdout, result.stdout
    assert "skipped where nothing may skip" in result.stdout and "the tool is missing" in result.stdout


def test_elsewhere_a_skip_stays_a_skip_and_its_reason_is_printed(tmp_path: Path) -> None:
    result = _run(tmp_path, CI="false")
    assert result.returncode == 0, result.stdout
    assert "1 passed, 2 skipped, 1 xfailed" in result.stdout, result.stdout
    assert "SKIPPED" in result.stdout and "the tool is missing" in result.stdout


def test_which_environments_are_strict() -> None:
    assert strict_skips({"CI": "true"}) and strict_skips({"CI": "1"}) and strict_skips({"MEMVISOR_IN_LAB": "1"})
    assert not strict_skips({}) and not strict_skips({"CI": "false"}) and not strict_skips({"CI": ""})
