"""The soak's settings (tests/guest/test_soak.py): what CI runs by default and what the environment
changes."""

from __future__ import annotations

import pytest

from tests.guest.test_soak import SIZES, soak_settings

MiB = 1 << 20


def test_ci_runs_200_small_rounds_on_2_vcpus_within_15_minutes() -> None:
    settings = soak_settings({})
    assert settings.size.name == "small" and settings.rounds == 200 and settings.vcpu_counts == [2]
    assert settings.budget == 900  # the wall-clock guard: well inside the guest stage's 60 minutes
    assert settings.timeout == 600 + 200 * 10 and settings.timeout > settings.budget + 240  # boot fits too


def test_the_small_moves_stay_inside_one_linux_memory_block_in_whole_sub_blocks() -> None:
    small = SIZES["small"]
    sub_block, memory_block = 4 * MiB, 128 * MiB  # Linux 6.1 on x86
    assert small.mem_base % sub_block == 0 and small.mem_step % sub_block == 0
    assert small.mem_base > 0 and small.mem_base + small.mem_step <= memory_block


def test_the_large_moves_stay_one_round_unless_told() -> None:
    settings = soak_settings({"MEMVISOR_SOAK_SIZE": "large"})
    assert settings.rounds == 1 and settings.budget is None and settings.size.mem_step == 1 << 30
    assert soak_settings({"MEMVISOR_SOAK_SIZE": "large", "MEMVISOR_SOAK_ROUNDS": "3"}).rounds == 3


def test_rounds_and_vcpus_override_both_sizes() -> None:
    settings = soak_settings({"MEMVISOR_SOAK_ROUNDS": "1000", "MEMVISOR_SOAK_VCPUS": "1,2"})
    assert settings.rounds == 1000 and settings.vcpu_counts == [1, 2] and settings.budget == 120 + 3.9 * 1000


@pytest.mark.parametrize(
    "environ",
    [{"MEMVISOR_SOAK_SIZE": "huge"}, {"MEMVISOR_SOAK_ROUNDS": "many"}, {"MEMVISOR_SOAK_ROUNDS": "0"},
     {"MEMVISOR_SOAK_VCPUS": "2,"}],
)  # fmt: skip
def test_bad_settings_are_named(environ: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="MEMVISOR_SOAK|at least 1"):
        soak_settings(environ)
