"""The arrows that must never exist: model/ imports neither the service nor the store, and the store
imports neither the service nor the model. Each package is imported whole in a fresh interpreter and
the modules it pulled in are listed."""

from __future__ import annotations

import subprocess
import sys

import pytest


def imported_by(package: str) -> set[str]:
    """The top-level packages that importing every module of ``package`` brings in."""
    code = (
        "import sys, pkgutil, importlib; "
        f"pkg = importlib.import_module('{package}'); "
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.')]; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, timeout=120, capture_output=True, text=True
    )
    return set(out.stdout.split())


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("model", {"service", "memory_store", "fastapi", "redis"}), ("memory_store", {"service", "model"})],
)
def test_a_package_imports_nothing_across_its_layer(package: str, forbidden: set[str]) -> None:
    got = imported_by(package)
    assert package in got  # the import ran
    assert not got & forbidden, got & forbidden
