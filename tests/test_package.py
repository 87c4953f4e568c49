"""The package's import structure: every module imports on its own, first, in
a fresh interpreter (no import cycle bites whichever module comes first), and
no module imports another module of the package inside a function or class
body, where a cycle would hide until that code first runs.

Imports of optional third-party modules inside functions (mpi4py, cupy's
NCCL through importlib, ...) are fine and not checked.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "minitorch_gx"
FILES = sorted(PACKAGE.rglob("*.py"))


def _module_name(path):
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = [_module_name(p) for p in FILES]
# the ones whose place in the layers matters most: the core, an op family,
# both sides of the distributed package, the kernels' device
FIRST_IMPORTS = ["minitorch_gx", "minitorch_gx.autograd", "minitorch_gx.ops.basic",
                 "minitorch_gx.distributed.failures", "minitorch_gx.distributed.process_group",
                 "minitorch_gx.cuda.device"]


def test_the_named_modules_exist():
    assert set(FIRST_IMPORTS) <= set(MODULES), sorted(set(FIRST_IMPORTS) - set(MODULES))


@pytest.mark.parametrize("module", sorted(set(MODULES) | set(FIRST_IMPORTS)))
def test_module_imports_first_in_a_fresh_interpreter(module):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"import {module} failed on its own:\n{proc.stderr[-3000:]}"


def _is_package_import(node):
    """``import minitorch_gx...``, ``from minitorch_gx... import``, ``from . import``."""
    if isinstance(node, ast.Import):
        return any(a.name == "minitorch_gx" or a.name.startswith("minitorch_gx.")
                   for a in node.names)
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] == "minitorch_gx"
    return False


def _is_dynamic_package_import(node):
    """``importlib.import_module("minitorch_gx...")`` / ``__import__(".x")`` with a literal."""
    if not isinstance(node, ast.Call) or not node.args:
        return False
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
    arg = node.args[0]
    return (name in ("import_module", "__import__") and isinstance(arg, ast.Constant)
            and isinstance(arg.value, str)
            and (arg.value.startswith(".") or arg.value.split(".")[0] == "minitorch_gx"))


def _nested_package_imports(path):
    """(line, text) of every package import inside a def or class body."""
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node, nested):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                 ast.ClassDef, ast.Lambda))
            if nested and (_is_package_import(child) or _is_dynamic_package_import(child)):
                found.append((child.lineno, ast.unparse(child)))
            visit(child, inner)

    visit(tree, False)
    return found


def test_no_module_imports_the_package_inside_a_function():
    offenders = [f"{path.relative_to(REPO)}:{line}: {text}"
                 for path in FILES for line, text in _nested_package_imports(path)]
    assert not offenders, ("imports of the package inside a function or class body (move them "
                           "to the top of the module):\n" + "\n".join(offenders))


def test_the_check_sees_nested_imports(tmp_path):
    """The static check itself: it finds each kind of nested import, and only those."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\n"
        "from . import backend\n"                         # module level: fine
        "try:\n    from .cuda import device\nexcept ImportError:\n    device = None\n"
        "def f():\n"
        "    import mpi4py\n"                             # third party: fine
        "    from . import autograd\n"                    # 9
        "    import minitorch_gx.ops.basic\n"             # 10
        "    importlib.import_module('minitorch_gx.cuda')\n"  # 11
        "    importlib.import_module('cupy.cuda.nccl')\n"
        "class C:\n"
        "    def m(self):\n"
        "        from ..nn import Module\n")              # 15
    assert [line for line, _ in _nested_package_imports(sample)] == [9, 10, 11, 15]
