"""The package's shape: no import cycles, and a command line that imports lazily.

The layering itself (app above distributed/io/inference above nn above the layer
above functional above kernels) is the import-linter contract in pyproject.toml,
which ``.ci/run`` checks with ``lint-imports``.
"""

from __future__ import annotations

import json

import grimp
import pytest

from helpers.processes import run_python


def test_no_import_cycles_in_the_package():
    graph = grimp.build_graph("batchnorm")
    cycles = sorted(
        (module, imported)
        for module in graph.modules
        for imported in graph.find_modules_directly_imported_by(module)
        if graph.chain_exists(importer=imported, imported=module)
    )
    assert cycles == []


def test_the_library_never_imports_the_application():
    graph = grimp.build_graph("batchnorm")
    app = {
        m
        for m in graph.modules
        if m == "batchnorm.app" or m.startswith("batchnorm.app.")
    }
    library = set(graph.modules) - app - {"batchnorm"}
    importers = {
        module
        for module in library
        if graph.find_modules_directly_imported_by(module) & app
    }
    assert importers == set()


def _modules_after(argv: list[str]) -> set[str]:
    code = (
        "import json, sys\n"
        "from batchnorm.app import main\n"
        "try:\n"
        f"    main.main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "sys.stdout.flush()\n"
        "print('\\n' + json.dumps(sorted(m for m in sys.modules "
        "if m.startswith('batchnorm'))))\n"
    )
    return set(json.loads(run_python(code).splitlines()[-1]))


HEAVY = ("batchnorm.nn", "batchnorm.io", "batchnorm.distributed", "batchnorm.inference")


def test_help_imports_no_command_module():
    loaded = _modules_after(["--help"])
    commands = {m for m in loaded if m.startswith("batchnorm.app.")} - {
        "batchnorm.app.main"
    }
    assert commands == set()
    assert not [m for m in loaded if m.startswith(HEAVY)]


@pytest.mark.parametrize(
    ("command", "modules"),
    [
        ("demo", {"batchnorm.app.demo", "batchnorm.app.demo.report"}),
        ("bench", {"batchnorm.app.bench", "batchnorm.app.machine"}),
        ("convert", {"batchnorm.app.convert"}),
        ("inspect", {"batchnorm.app.inspect"}),
        ("train", {"batchnorm.app.train"}),
        ("example", {"batchnorm.app.example"}),
    ],
)
def test_a_command_help_imports_its_own_modules_only(command, modules):
    loaded = _modules_after([command, "--help"])
    app = {m for m in loaded if m.startswith("batchnorm.app.")}
    assert app == modules | {"batchnorm.app.main"}
    assert not [m for m in loaded if m.startswith(HEAVY)]
