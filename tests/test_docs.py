"""docs/plugins.md documents every hookspec, with the signature written in hookspecs.py."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pluggy
import pytest

from kvserve.plugins import hookspecs, interfaces

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
HEADING = re.compile(r"^### `(?P<signature>(?P<name>\w+)\(.*)`\s*$", re.MULTILINE)


def hook_specs() -> dict:
    """name -> pluggy's HookSpec (function and opts) for every hookspec pluggy registers."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return {name: caller.spec for name, caller in vars(pm.hook).items() if isinstance(caller, pluggy.HookCaller)}


def documented_hooks() -> dict[str, tuple[str, str]]:
    """name -> (signature in the heading, text of the section under it)."""
    text = DOC.read_text()
    matches = list(HEADING.finditer(text))
    sections = {}
    for match, following in zip(matches, matches[1:] + [None]):
        end = following.start() if following else text.find("\n## ", match.end())
        sections[match["name"]] = (match["signature"], text[match.end():end if end != -1 else None])
    return sections


def source_signature(function) -> str:
    """The hookspec's signature as written in the source (annotations are strings there)."""
    signature = inspect.signature(function)
    params = []
    for param in signature.parameters.values():
        assert param.annotation is param.empty or isinstance(param.annotation, str)
        text = param.name if param.annotation is param.empty else f"{param.name}: {param.annotation}"
        params.append(text if param.default is param.empty else f"{text} = {param.default!r}")
    returns = "" if signature.return_annotation is signature.empty else f" -> {signature.return_annotation}"
    return f"{function.__name__}({', '.join(params)}){returns}"


SPECS = hook_specs()


def test_pluggy_finds_every_marked_hookspec():
    marked = {name for name, obj in vars(hookspecs).items() if hasattr(obj, f"{hookspecs.PROJECT}_spec")}
    assert set(SPECS) == marked
    assert len(SPECS) >= 11


def test_every_hook_is_documented_and_nothing_else():
    assert set(documented_hooks()) == set(SPECS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_documented_signature_matches_source(name):
    documented, _ = documented_hooks()[name]
    assert documented == source_signature(SPECS[name].function)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_documented_firstresult_matches_spec(name):
    _, section = documented_hooks()[name]
    firstresult = bool(SPECS[name].opts.get("firstresult"))
    assert f"firstresult={firstresult}" in section, f"{name}: the section must say firstresult={firstresult}"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hookspec_has_docstring(name):
    doc = inspect.getdoc(SPECS[name].function)
    assert doc and len(doc) > 20, f"hookspec {name} has no docstring"


def test_contract_version_is_documented():
    assert f"CONTRACT_VERSION = {hookspecs.CONTRACT_VERSION}" in DOC.read_text()


INTERFACES = sorted(name for name, obj in vars(interfaces).items()
                    if inspect.isclass(obj) and obj.__module__ == interfaces.__name__)


@pytest.mark.parametrize("name", INTERFACES)
def test_interface_is_documented_and_has_docstring(name):
    assert f"`{name}`" in DOC.read_text()
    doc = vars(getattr(interfaces, name)).get("__doc__") or ""
    assert doc and not doc.startswith(f"{name}("), f"{name} has no docstring (only the dataclass default)"


def test_signature_helper_reads_source_annotations():
    assert source_signature(SPECS["platform_graph_runner"].function) == (
        "platform_graph_runner(model: torch.nn.Module, backend: AttentionBackend, "
        "config: EngineConfig) -> GraphRunner | None")
    assert source_signature(SPECS["platform_detect"].function) == "platform_detect() -> PlatformInfo | None"
