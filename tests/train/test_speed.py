"""The CPU allocator policy of deltatune/train/speed.py: valid choices only, and on glibc the
settings really take effect (mallopt accepts every value)."""
from __future__ import annotations

import ctypes.util
import sys

import pytest

from deltatune.errors import ConfigError
from deltatune.train.speed import SpeedOptions, set_allocator_policy

GLIBC = sys.platform.startswith("linux") and ctypes.util.find_library("c") is not None


def test_unknown_policy_is_a_config_error():
    with pytest.raises(ConfigError, match="allocator 'fast'"):
        SpeedOptions(allocator="fast")


@pytest.mark.skipif(not GLIBC, reason="the allocator policy only applies to glibc (Linux)")
@pytest.mark.parametrize("policy", ["release", "reuse"])
def test_policies_take_effect_on_glibc(policy):
    assert set_allocator_policy(policy) is True


def test_system_policy_changes_nothing():
    assert set_allocator_policy("system") is False
