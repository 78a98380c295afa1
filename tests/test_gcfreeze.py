"""Import-time objects are frozen at start-up, so a full collection no longer walks them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CODE = """
import gc
import migd.cli  # everything a daemon imports
before = len(gc.get_objects())
from migd.gcfreeze import freeze_startup_objects
frozen = freeze_startup_objects()
after = len(gc.get_objects())
garbage = []
garbage.append(garbage)  # a cycle made after the freeze is still collected
del garbage
print(before, frozen, after, gc.collect())
"""


def test_freeze_startup_objects_takes_the_import_time_objects_out_of_full_collections() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=120).stdout.split()
    before, frozen, after, collected = (int(x) for x in out)
    assert frozen >= before // 2 > 0  # the bulk of what the imports made
    assert after < before // 10  # a full collection now walks a small remainder
    assert collected >= 1  # and still frees new cycles


def test_cli_freezes_before_running_the_daemon() -> None:
    src = (ROOT / "migd" / "cli.py").read_text()
    body = src[src.index("def main("):]
    assert body.index("freeze_startup_objects()") < body.index("Daemon(config).run()")
