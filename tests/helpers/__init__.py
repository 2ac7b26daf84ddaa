"""Code the tests share; never imported by src/.

- :mod:`helpers.naive`: a naive, one-channel-at-a-time float64 batch norm.
- :mod:`helpers.gradchecks`: float64 finite-difference gradient checks.
- :mod:`helpers.launcher_spy`: a record of the Numba launcher's calls.
- :mod:`helpers.channels`: per-channel reshaping and sums.
- :mod:`helpers.kernel_cases`: the kernels' layouts, dtypes, inputs, and the
  summation error bound they are compared within.
- :mod:`helpers.processes`: run Python code in a fresh interpreter.

Imported as ``from helpers.naive import ...``: ``tests/conftest.py`` puts
``tests/`` on ``sys.path`` (see its docstring).
"""
