"""workers.gc_freeze: start-up objects leave the garbage collector's full collections."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_start_up_objects_are_frozen_and_later_ones_still_collected():
    # In a fresh interpreter: freezing this test process would keep its objects out of collections for the rest
    # of the suite.
    code = textwrap.dedent("""
        import gc, json, logging, weakref
        logging.basicConfig(level=logging.INFO)
        from workers.gc_freeze import freeze_startup_objects

        class Node:
            pass

        garbage = Node(); garbage.me = garbage     # a cycle left over from start-up: collected, not frozen
        probe = weakref.ref(garbage); del garbage
        frozen = freeze_startup_objects("test")
        collected_before_freeze = probe() is None
        after = Node(); after.me = after           # a cycle made after the freeze: still collected
        later = weakref.ref(after); del after
        gc.collect()
        print(json.dumps({"frozen": frozen, "count": gc.get_freeze_count(),
                          "tracked_after": len(gc.get_objects()),
                          "collected_before_freeze": collected_before_freeze, "collected_later": later() is None}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["frozen"] == out["count"] > 1000             # every object alive then
    assert out["tracked_after"] < out["frozen"] / 2         # what a full collection still walks
    assert out["collected_before_freeze"] and out["collected_later"]
    assert "test: " in proc.stderr and "start-up objects frozen" in proc.stderr
