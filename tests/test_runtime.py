"""Entry-point runtime settings: glibc keeps freed tensor memory instead of unmapping it."""

import os
import subprocess
import sys

import pytest

PROBE = """
import os, sys
import numpy as np
from mimo_chat.runtime import keep_freed_memory

def rss_mb():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

applied = keep_freed_memory()
before = rss_mb()
block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MB, touched
del block
print(applied, rss_mb() - before)
"""


def _probe(**env):
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                            env={**os.environ, **env})
    applied, kept = result.stdout.split()
    return applied == "True", float(kept)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_memory_is_kept_and_can_be_switched_off():
    applied, kept = _probe()
    assert applied and kept > 60  # the freed 64 MB stays with the process for the next tensor
    applied, kept = _probe(MIMO_CHAT_DEFAULT_MALLOC="1")
    assert not applied and kept < 4  # glibc's default: a block this large is unmapped when freed
