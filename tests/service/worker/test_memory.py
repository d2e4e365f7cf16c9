"""The worker's allocator setting: freed activation-sized blocks go back to the OS."""

from __future__ import annotations

import subprocess
import sys

import pytest

# In a fresh process (mallopt is process-wide): a 16 MiB block freed, then an 8 MiB one; the
# resident growth left afterwards, in KiB.
SCRIPT = """
import sys
from pathlib import Path
from service.worker.memory import limit_heap_growth

def rss_kib():
    lines = Path("/proc/self/status").read_text().splitlines()
    return int(next(x for x in lines if x.startswith("VmRSS:")).split()[1])

if sys.argv[1] == "limit":
    assert limit_heap_growth()
before = rss_kib()
for mib in (16, 8):
    block = bytearray(b"x") * (mib << 20)
    del block
print(rss_kib() - before)
"""


def _growth_kib(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_leave_the_process_with_the_limit() -> None:
    # glibc alone raises its mmap threshold to the 16 MiB block freed, so the 8 MiB block comes
    # from the heap and stays resident; with the fixed threshold both are unmapped when freed.
    assert _growth_kib("default") >= 6 * 1024
    assert _growth_kib("limit") < 2 * 1024
