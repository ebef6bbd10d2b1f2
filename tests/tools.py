"""The outside programs some tests use for real (prometheus, promtool, helm, kubectl), found on
PATH or in .tools/bin (where .ci/install-test-tools puts them). Missing ones skip a test on a
developer's machine and fail it in CI (CI=true), where the test command installs them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

TOOLS_BIN = Path(__file__).resolve().parents[1] / ".tools" / "bin"


def require(name: str) -> str:
    """The path of the program ``name``."""
    found = shutil.which(name) or shutil.which(name, path=str(TOOLS_BIN))
    if found:
        return found
    message = f"{name} is not installed: run bash .ci/install-test-tools"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
