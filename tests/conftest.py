"""The test suite's shared setup: how tests reach ``tests/helpers``.

Layout: ``tests/`` mirrors ``src/batchnorm/``. ``core/`` tests the library's
top-level modules (functional, moments, running_stats, layer, options, presets,
ghost, renorm, inference, _validation, _memory); ``kernels/``, ``nn/``, ``io/``,
``distributed/`` and ``app/`` test the subpackages of those names. ``helpers/``
is a package of code the tests share (never imported by src/); fixtures shared
by one directory live in that directory's ``conftest.py``.

Imports: pytest runs with ``--import-mode=importlib`` (pyproject.toml), which
leaves ``sys.path`` alone, and the test directories are not packages (so test
files in different directories may share a basename). There is no
``pythonpath`` setting: this file puts its own directory, ``tests/``, first on
``sys.path`` when pytest loads it, which is before it imports any test module,
so tests import the shared code as the package ``helpers``::

    from helpers import naive
    from helpers.gradchecks import directional_check

The same holds for the MPI suite (``tests/distributed/mpi_suite``), which
``mpiexec`` runs in pytest processes of its own: pytest loads this file for
every path below ``tests/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
