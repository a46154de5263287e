"""The core never reaches device-specific code, and kernels never reach the engine."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

FORBIDDEN_IN_CORE = ("torch.cuda", "torch.xpu", "torch.npu", "torch_npu", "triton", "flash_attn", "flashinfer",
                     "intel_extension_for_pytorch", "habana_frameworks", "kvserve.platforms",
                     "kvserve.kernels_cpu", "kvserve.kernels_cuda", "kvserve.kernels_rocm")
FORBIDDEN_IN_KERNELS = ("kvserve.core",)
KERNEL_PACKAGES = ("kvserve.kernels_cpu", "kvserve.kernels_cuda", "kvserve.kernels_rocm")


def is_forbidden(module: str, forbidden: tuple[str, ...]) -> bool:
    return any(module == name or module.startswith(name + ".") for name in forbidden)


def dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``torch.cuda.synchronize`` for an attribute chain, with the root resolved through import aliases."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = dotted(node.value, aliases)
        return f"{base}.{node.attr}" if base else None
    return None


def import_base(node: ast.ImportFrom, package: str) -> str:
    """The absolute module of ``from <module> import ...``, relative imports resolved against ``package``."""
    if node.level:
        return importlib.util.resolve_name("." * node.level + (node.module or ""), package)
    return node.module


def referenced_modules(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """(line, dotted name) for every import, dynamic import, getattr(module, "x") and attribute chain."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.split(".")[0]
                aliases[alias.asname or root] = alias.name if alias.asname else root
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{import_base(node, package)}.{alias.name}"
    found = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            found += [(line, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = import_base(node, package)
            found += [(line, base)] + [(line, f"{base}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Attribute):
            name = dotted(node, aliases)
            if name:
                found.append((line, name))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[-1], ast.Constant):
            func = dotted(node.func, aliases)
            value = node.args[-1].value
            if func in ("importlib.import_module", "__import__") and isinstance(value, str):
                found.append((line, value))
            elif func == "getattr" and len(node.args) == 2 and isinstance(value, str):
                base = dotted(node.args[0], aliases)
                if base:
                    found.append((line, f"{base}.{value}"))
    return found


def violations(source: str, package: str, forbidden: tuple[str, ...], filename: str = "<snippet>") -> list[str]:
    tree = ast.parse(source, filename)
    return [f"{filename}:{line}: {name}" for line, name in referenced_modules(tree, package)
            if is_forbidden(name, forbidden)]


def package_files(package: str) -> list[tuple[str, Path]]:
    """(package of the file, path) for every .py file of an installed package, without importing it."""
    root = Path(next(iter(importlib.util.find_spec(package).submodule_search_locations)))
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).parent.parts]
        files.append((".".join(parts), path))
    return files


def scan(packages: tuple[str, ...], forbidden: tuple[str, ...]) -> tuple[int, list[str]]:
    files = [entry for package in packages for entry in package_files(package)]
    found = [v for package, path in files for v in violations(path.read_text(), package, forbidden, str(path))]
    return len(files), found


def test_core_imports_nothing_device_specific():
    count, found = scan(("kvserve.core",), FORBIDDEN_IN_CORE)
    assert count > 10
    assert found == [], "core must reach devices only through kvserve.plugins:\n" + "\n".join(found)


def test_kernels_never_import_the_engine():
    count, found = scan(KERNEL_PACKAGES, FORBIDDEN_IN_KERNELS)
    assert count >= len(KERNEL_PACKAGES)
    assert found == [], "kernels must not depend on kvserve.core:\n" + "\n".join(found)


# What kvserve.plugins' contract says a platform plugin imports: kvserve.plugins, torch and its own libraries.
FORBIDDEN_IN_PLATFORM_PLUGINS = ("kvserve.core", "kvserve.platforms", *KERNEL_PACKAGES)
ROOT = Path(__file__).resolve().parents[1]
OUT_OF_TREE_PLATFORMS = [ROOT / "examples" / "vendor_plugin" / "kvserve_example_platform" / "plugin.py",
                         *sorted((ROOT / "tests" / "plugins").glob("*_platform/*/plugin.py"))]


def test_out_of_tree_platforms_import_only_the_contract():
    assert len(OUT_OF_TREE_PLATFORMS) >= 4
    found = [v for path in OUT_OF_TREE_PLATFORMS
             for v in violations(path.read_text(), path.parent.name, FORBIDDEN_IN_PLATFORM_PLUGINS, str(path))]
    assert found == [], "platform plugins must use only kvserve.plugins:\n" + "\n".join(found)


FLAGGED = [
    "import torch.cuda",
    "import torch.npu as npu",
    "from torch import cuda",
    "from torch.cuda import synchronize",
    "import torch\ntorch.cuda.synchronize()",
    "import torch as t\nt.xpu.device_count()",
    "import torch\nx = getattr(torch, 'cuda')",
    "def f():\n    import triton.language as tl",
    "class A:\n    def f(self):\n        from flash_attn import flash_attn_func",
    "import flashinfer",
    "import torch_npu",
    "import intel_extension_for_pytorch as ipex",
    "import habana_frameworks.torch.core",
    "from kvserve.platforms.cpu.plugin import platform_detect",
    "from kvserve import kernels_cuda",
    "from kvserve.kernels_cpu.paged_attention import store_kv",
    "from ...platforms import cpu",
    "from ... import kernels_rocm",
    "import importlib\nimportlib.import_module('triton')",
]
ALLOWED = [
    "import torch",
    "import torch.nn.functional as F",
    "from torch import nn",
    "import tritonclient",
    "x = tensor.cuda()",
    "import torch\ntorch.cuda_like = 1",
    "from kvserve.plugins.interfaces import AttentionBackend",
    "from ..layers import ops",
    "import kvserve.plugins.manager",
]


@pytest.mark.parametrize("snippet", FLAGGED)
def test_checker_flags_forbidden_snippet(snippet):
    assert violations(snippet, "kvserve.core.engine", FORBIDDEN_IN_CORE)


@pytest.mark.parametrize("snippet", ALLOWED)
def test_checker_allows_portable_snippet(snippet):
    assert violations(snippet, "kvserve.core.engine", FORBIDDEN_IN_CORE) == []


@pytest.mark.parametrize("snippet", ["from kvserve.core.config import EngineConfig", "from ..core import config",
                                     "import kvserve.core.engine.llm_engine"])
def test_checker_flags_kernel_importing_core(snippet):
    assert violations(snippet, "kvserve.kernels_cpu", FORBIDDEN_IN_KERNELS)
