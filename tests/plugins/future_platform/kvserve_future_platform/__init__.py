"""Stands in for a plugin built against a later kvserve: its hooks may not mean what this kvserve's do, so it is
refused at discovery, and its platform_detect is never called."""
from kvserve.plugins import hookimpl
from kvserve.plugins.interfaces import PlatformInfo

KVSERVE_CONTRACT_VERSION = 99


@hookimpl
def platform_detect() -> PlatformInfo:
    raise AssertionError("a refused plugin's hooks are never called")
