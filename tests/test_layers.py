"""The architecture, checked on the source: kernel/ is the only home of raw kernel
calls, and each layer imports only its own layer or those below it.

Layers, lowest first: image/ -> fsverity -> sources/ -> repository/ -> kernel/ ->
service/ -> cli/. The leaf modules of kernel/ (all but the mount stack) import
nothing of composefsd outside those leaves, so every layer may call them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import composefsd

PACKAGE = Path(composefsd.__file__).resolve().parent

# Rank of each top-level part of composefsd; a module may import ranks up to its own.
# The small helper modules at the top sit with sources/, where the README lists them.
_RANKS = {
    "composefsd": 0,  # the package itself: the version
    "image": 0,
    "fsverity": 1,
    "objectlayout": 1,
    "splitstream": 1,
    "sources": 2,
    "credentials": 2,
    "dirs": 2,
    "verity_policy": 2,
    "workerproc": 2,
    "objectcheck": 2,
    "cpus": 2,
    "repository": 3,
    "kernel": 4,
    "service": 5,
    "__main__": 5,  # python -m composefsd: the daemon
    "cli": 6,
}
# kernel/ modules above the repository layer; every other kernel module is a leaf.
_KERNEL_UPPER = frozenset(
    {
        "composefsd.kernel",
        "composefsd.kernel.imagecache",
        "composefsd.kernel.mount",
        "composefsd.kernel.ownmount",
        "composefsd.kernel.repomount",
    }
)


@dataclass(slots=True, frozen=True)
class _Import:
    target: str
    line: int


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _is_kernel_leaf(module: str) -> bool:
    return module.startswith("composefsd.kernel.") and module not in _KERNEL_UPPER


def _rank(module: str) -> int:
    parts = module.split(".")
    part = parts[1] if len(parts) > 1 else "composefsd"
    assert part in _RANKS, f"{module}: give composefsd.{part} a layer in tests/test_layers.py"
    return _RANKS[part]


def _resolve_from(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _imports(module: str, tree: ast.AST) -> list[_Import]:
    """Every composefsd module ``module`` imports, at the top or inside functions."""
    found: list[_Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [_Import(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append(_Import(sub if sub in MODULES else base, node.lineno))
    return [i for i in found if i.target == "composefsd" or i.target.startswith("composefsd.")]


def _raw_kernel_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """ctypes imports and fcntl.ioctl calls (also through ``from fcntl import ioctl``
    and ``import fcntl as x``)."""
    found: list[tuple[int, str]] = []
    fcntl_names: set[str] = set()
    ioctl_names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ctypes":
                    found.append((node.lineno, "imports ctypes"))
                if alias.name == "fcntl":
                    fcntl_names.add(alias.asname or "fcntl")
        elif isinstance(node, ast.ImportFrom) and not node.level:
            if (node.module or "").split(".")[0] == "ctypes":
                found.append((node.lineno, "imports from ctypes"))
            if node.module == "fcntl":
                ioctl_names.update(a.asname or a.name for a in node.names if a.name == "ioctl")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if (
            isinstance(func, ast.Attribute)
            and func.attr == "ioctl"
            and isinstance(func.value, ast.Name)
            and func.value.id in fcntl_names
        ) or (isinstance(func, ast.Name) and func.id in ioctl_names):
            found.append((node.lineno, "calls fcntl.ioctl"))
    return found


def _parse(module: str) -> ast.AST:
    path = MODULES[module]
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_the_layers_are_known() -> None:
    assert "composefsd.kernel.verity" in MODULES
    assert "composefsd.image.format" in MODULES
    for module in MODULES:
        _rank(module)


def test_raw_kernel_calls_only_in_kernel() -> None:
    problems = [
        f"{MODULES[module].relative_to(PACKAGE.parent)}:{line}: {what}"
        for module in MODULES
        if not module.startswith("composefsd.kernel.")
        for line, what in _raw_kernel_calls(_parse(module))
    ]
    assert not problems, "raw kernel calls outside composefsd/kernel/:\n" + "\n".join(problems)


def test_raw_call_check_sees_them() -> None:
    # The check itself: each form it must catch, and the standard wrappers it must not.
    code = (
        "import ctypes\nimport fcntl as f\nfrom fcntl import ioctl as io\n"
        "f.ioctl(1, 2, 3)\nio(1, 2)\nf.flock(1, 2)\n"
    )
    assert [line for line, _ in _raw_kernel_calls(ast.parse(code))] == [1, 4, 5]


def test_layer_order() -> None:
    problems: list[str] = []
    for module in MODULES:
        where = MODULES[module].relative_to(PACKAGE.parent)
        leaf = _is_kernel_leaf(module)
        for imp in _imports(module, _parse(module)):
            if imp.target not in MODULES:
                problems.append(f"{where}:{imp.line}: imports unknown module {imp.target}")
            elif leaf:
                if not _is_kernel_leaf(imp.target):
                    problems.append(
                        f"{where}:{imp.line}: kernel leaf module imports {imp.target}, "
                        "which is not a kernel leaf"
                    )
            elif not _is_kernel_leaf(imp.target) and _rank(imp.target) > _rank(module):
                problems.append(f"{where}:{imp.line}: imports {imp.target} from a higher layer")
    assert not problems, "layering violations:\n" + "\n".join(problems)


def test_kernel_leaves_import_no_mount_stack() -> None:
    leaves = sorted(m for m in MODULES if _is_kernel_leaf(m))
    assert "composefsd.kernel.files" in leaves
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in leaves)
        + "print('\\n'.join(m for m in sys.modules if m.startswith('composefsd')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()
    allowed = {"composefsd", "composefsd.kernel", *leaves}
    extra = sorted(set(out) - allowed)
    assert not extra, f"importing the kernel leaf modules also loaded {extra}"
