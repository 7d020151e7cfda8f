"""Step aside for Hugging Face's ``kernels`` package when this folder is imported by that name.

The repository keeps its kernels in a top-level ``kernels/`` folder, installed as
``hfcompress.kernels``. A Python started in the repository root has the root on ``sys.path``
first, where ``import kernels`` (transformers imports the Kernel Hub package of that name) would
find this folder instead.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def hand_over(init_file: str) -> None:
    """Make ``import kernels`` give the Kernel Hub package: load it from ``sys.path`` without the
    folder that holds this one, and put it in ``sys.modules`` (the import statement then returns
    it). Without that package installed, ``import kernels`` fails as it would without us."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    path = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError("No module named 'kernels' (the kernels/ folder of the hfcompress repository is "
                                  "hfcompress.kernels, not Hugging Face's Kernel Hub package)", name="kernels")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    sys.modules.pop("kernels._shadow", None)  # this file, imported under the other package's name
    spec.loader.exec_module(module)
