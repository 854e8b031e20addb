"""Every error mpkv raises lives in mpkv.errors and is exported from mpkv."""

from __future__ import annotations

import inspect
import subprocess
import sys

import mpkv
from mpkv import errors


def test_every_error_is_defined_in_errors_and_exported() -> None:
    defined = {name for name, obj in inspect.getmembers(errors, inspect.isclass) if obj.__module__ == errors.__name__}
    assert "MpkvError" in defined and len(defined) > 10
    assert defined <= set(mpkv.__all__), f"not exported from mpkv: {sorted(defined - set(mpkv.__all__))}"
    for name in defined:
        assert getattr(mpkv, name) is getattr(errors, name)
        assert issubclass(getattr(errors, name), errors.MpkvError), f"{name} does not derive from MpkvError"
    # No public module defines an error of its own (internal ones: the runtime's TaskError, the CLI's UsageError).
    import pkgutil

    internal = {"TaskError", "UsageError", "BenchError"}
    for info in pkgutil.walk_packages(mpkv.__path__, "mpkv."):
        if info.name.startswith("mpkv.bench") or info.name in ("mpkv._native", "mpkv.errors"):
            continue
        module = __import__(info.name, fromlist=["_"])
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Exception) and obj.__module__ == info.name:
                assert name in internal, f"{info.name} defines {name}: public errors belong in mpkv.errors"


def test_importing_mpkv_and_its_commands_does_not_import_torch() -> None:
    """`mpkv --version`, a usage error, `mpkv ctl`, `mpkv-top`: none needs torch (seconds of CPU per start, which a
    2-core machine running an instance feels); only the actors and the models import it."""
    code = (
        "import sys, mpkv, mpkv.cli, mpkv.top, mpkv.controller\n"
        "print(sorted(m for m in ('torch', 'safetensors') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr)
