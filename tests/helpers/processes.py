"""Python code run in a fresh interpreter (not used by src/)."""

from __future__ import annotations

import os
import subprocess
import sys


def run_python(code: str, **env: str) -> str:
    """Run ``code`` with ``python -c`` and this environment plus ``env``; its
    stripped stdout. Raises ``CalledProcessError`` when it fails."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    )
    return result.stdout.strip()
