"""glibc malloc thresholds (service.allocator): applied when asked, left alone at 0."""

import ctypes.util
import platform

import pytest

from service.allocator import keep_freed_memory
from service.settings import Settings


def test_zero_keeps_the_c_library_defaults():
    assert keep_freed_memory(0) is False


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_thresholds_apply_on_glibc():
    assert ctypes.util.find_library("c")
    assert keep_freed_memory(Settings().malloc_keep_mb) is True
    assert keep_freed_memory(2047) is True  # the largest setting fits mallopt's int


def test_setting_is_bounded(monkeypatch):
    monkeypatch.setenv("CXR_MALLOC_KEEP_MB", "4096")
    with pytest.raises(ValueError):
        Settings()
