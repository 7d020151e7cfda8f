"""Run Python in a fresh process where hfcompress cannot be imported, as a user without it would.

Folders that hfcompress saves for the rest of the ecosystem are checked this way: stock
transformers (and compressed-tensors, when installed) load them, or refuse them loudly.

>>> run_without_hfcompress("import json; print(json.dumps({'ok': True}))")
{'ok': True}
"""

from __future__ import annotations

import json
import subprocess
import sys

BLOCKER = """
import importlib.abc, sys
class NoPlugin(importlib.abc.MetaPathFinder):  # this process must do without hfcompress
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "hfcompress":
            raise ImportError("hfcompress is not installed here")
sys.meta_path.insert(0, NoPlugin())
"""


def run_without_hfcompress(script: str, *args: str, timeout: float = 600) -> dict:
    """Run ``script`` (which prints one JSON object last) with ``args`` in ``sys.argv``; its result."""
    done = subprocess.run([sys.executable, "-c", BLOCKER + script, *args], capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the stock process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
