"""The kvserve plugin contract: hookspecs, the interfaces they return, and discovery."""
from kvserve.plugins.hookspecs import CONTRACT_VERSION, SUPPORTED_CONTRACT_VERSIONS, hookimpl

__all__ = ["CONTRACT_VERSION", "SUPPORTED_CONTRACT_VERSIONS", "hookimpl"]
