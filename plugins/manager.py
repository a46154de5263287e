"""Plugin discovery through entry points, and platform selection."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy
import torch

from kvserve.plugins import hookspecs
from kvserve.plugins.interfaces import (AttentionBackend, AttentionSpec, Communicator, GraphRunner,
                                        MemoryInfo, PlatformInfo, QuantizedWeight)

PLATFORM_GROUP = "kvserve.platforms"
GENERAL_GROUP = "kvserve.plugins"
PLATFORM_ENV = "KVSERVE_PLATFORM"

logger = logging.getLogger("kvserve")


@dataclass
class PluginRecord:
    """One discovered plugin, loaded or not, as ``kvserve plugins`` shows it."""

    name: str
    group: str
    package: str
    version: str
    plugin: Any = None
    error: str = ""
    info: PlatformInfo | None = None
    refused: bool = False   # loaded, but built for a plugin contract this kvserve does not support

    @property
    def status(self) -> str:
        if self.error:
            return f"{'refused' if self.refused else 'failed to load'}: {self.error}"
        if self.group == PLATFORM_GROUP:
            if self.info is None:
                return "not a platform (platform_detect returned None)"
            return "available" if self.info.available else f"unavailable: {self.info.unavailable_reason}"
        return "loaded"


class Platform:
    """The selected platform: calls only that plugin's ``platform_*`` hooks."""

    def __init__(self, manager: PluginManager, record: PluginRecord):
        self.manager = manager
        self.record = record
        self.info: PlatformInfo = record.info
        self.name = self.info.name
        self.device = torch.device(self.info.device_type)
        others = [p for p in manager.pm.get_plugins() if p is not record.plugin]
        self._hooks = {name: manager.pm.subset_hook_caller(name, remove_plugins=others)
                       for name in ("platform_bind_device", "platform_update_config", "platform_memory_info",
                                    "platform_attention_backend", "platform_graph_runner",
                                    "platform_communicator", "platform_ops", "platform_linear_kernel",
                                    "platform_gate_up_kernel", "platform_quant_kernel", "platform_seed",
                                    "platform_synchronize")}

    def _call(self, hook: str, **kwargs) -> Any:
        return self._hooks[hook](**kwargs)

    def bind_device(self, local_index: int) -> None:
        device = self._call("platform_bind_device", local_index=local_index)
        if device is not None:
            self.device = device
            logger.info("this process runs on %s (device %d of this machine's for the engine)", device, local_index)

    def update_config(self, config) -> None:
        self._call("platform_update_config", config=config)

    def memory_info(self) -> MemoryInfo:
        return self._required("platform_memory_info", device=self.device)

    def attention_backend(self, spec: AttentionSpec) -> type[AttentionBackend]:
        return self._required("platform_attention_backend", spec=spec)

    def graph_runner(self, model, backend: AttentionBackend, config) -> GraphRunner | None:
        return self._call("platform_graph_runner", model=model, backend=backend, config=config)

    def communicator(self, rank: int, world_size: int, group=None) -> Communicator:
        return self._required("platform_communicator", rank=rank, world_size=world_size, group=group)

    def ops(self) -> dict:
        return self._call("platform_ops") or {}

    def linear_kernel(self, weight: torch.Tensor):
        return self._call("platform_linear_kernel", weight=weight)

    def gate_up_kernel(self, weight: torch.Tensor):
        return self._call("platform_gate_up_kernel", weight=weight)

    def quant_kernel(self, weight: QuantizedWeight):
        return self._call("platform_quant_kernel", weight=weight)

    def seed(self, seed: int) -> None:
        self._call("platform_seed", seed=seed)

    def synchronize(self) -> None:
        self._call("platform_synchronize", device=self.device)

    def _required(self, hook: str, **kwargs) -> Any:
        result = self._call(hook, **kwargs)
        if result is None:
            raise TypeError(f"platform {self.name!r} does not implement the required hook {hook}")
        return result


class PluginManager:
    """Discovers plugins from entry points (or takes them directly) and selects a platform."""

    def __init__(self, discover: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.records: list[PluginRecord] = []
        if discover:
            for group in (PLATFORM_GROUP, GENERAL_GROUP):
                for ep in entry_points(group=group):
                    self._load(ep, group)

    def _load(self, ep, group: str) -> None:
        dist = ep.dist
        record = PluginRecord(ep.name, group, dist.name if dist else "?", dist.version if dist else "?")
        self.records.append(record)
        try:
            plugin = ep.load()
            record.error = incompatibility(plugin)
            if record.error:
                record.refused = True
                return
            self.register(plugin, ep.name, group, record)
        except Exception as exc:  # a broken plugin is reported, never fatal
            record.plugin, record.info, record.error = None, None, f"{type(exc).__name__}: {exc}"
            if self.pm.has_plugin(f"{group}:{ep.name}"):
                self.pm.unregister(name=f"{group}:{ep.name}")

    def register(self, plugin: Any, name: str, group: str = PLATFORM_GROUP,
                 record: PluginRecord | None = None) -> PluginRecord:
        """Register a plugin object directly (entry-point discovery calls this too)."""
        if record is None:
            record = PluginRecord(name, group, "(registered directly)", "")
            self.records.append(record)
        if group == PLATFORM_GROUP:
            detect = getattr(plugin, "platform_detect", None)
            record.info = detect() if detect is not None else None
        self.pm.register(plugin, name=f"{group}:{name}")
        record.plugin = plugin
        return record

    def platform_records(self) -> list[PluginRecord]:
        return [r for r in self.records if r.group == PLATFORM_GROUP and r.plugin is not None]

    def select_platform(self, requested: str | None = None) -> Platform:
        """The platform named by ``requested`` or ``KVSERVE_PLATFORM``, else the best available one."""
        requested = requested or os.environ.get(PLATFORM_ENV) or None
        found = [r for r in self.platform_records() if r.info is not None]
        listing = self.describe_platforms()
        if requested is not None:
            match = [r for r in found if r.info.name == requested]
            if not match:
                raise ValueError(f"platform {requested!r} is not installed; found: {listing}")
            if not match[0].info.available:
                raise ValueError(f"platform {requested!r} is unavailable: {match[0].info.unavailable_reason}; "
                                 f"found: {listing}")
            return Platform(self, match[0])
        available = [r for r in found if r.info.available]
        if not available:
            raise ValueError(f"no available platform; found: {listing}")
        best = max(r.info.priority for r in available)
        top = [r for r in available if r.info.priority == best]
        if len(top) > 1:
            names = ", ".join(r.info.name for r in top)
            raise ValueError(f"platforms {names} tie at priority {best}; choose one with {PLATFORM_ENV} or --device")
        return Platform(self, top[0])

    def describe_platforms(self) -> str:
        parts = [f"{r.info.name if r.info else r.name} ({r.status})"
                 for r in self.records if r.group == PLATFORM_GROUP]
        return ", ".join(parts) or "none"

    def models(self) -> dict[str, type]:
        return _merge(self.pm.hook.register_models(), "model architecture")

    def tool_parsers(self) -> dict[str, type]:
        """Plugins' tool call parser classes by name (kvserve's own are added by the parser registry)."""
        return _merge(self.pm.hook.register_tool_parsers(), "tool call parser")

    def reasoning_parsers(self) -> dict[str, type]:
        """Plugins' reasoning parser classes by name (kvserve's own are added by the parser registry)."""
        return _merge(self.pm.hook.register_reasoning_parsers(), "reasoning parser")


def incompatibility(plugin: Any) -> str:
    """Why a discovered plugin cannot be run, by the contract version it declares; "" if it can."""
    supported = ", ".join(map(str, hookspecs.SUPPORTED_CONTRACT_VERSIONS))
    declared = getattr(plugin, hookspecs.DECLARATION, None)
    if declared is None:
        return (f"declares no plugin contract version ({hookspecs.DECLARATION}); this kvserve supports "
                f"versions {supported}")
    if declared not in hookspecs.SUPPORTED_CONTRACT_VERSIONS:
        return (f"built for plugin contract version {declared!r}; this kvserve supports versions {supported} "
                f"(install a kvserve or a plugin release that match)")
    return ""


def _merge(results: list[dict], what: str) -> dict:
    merged: dict = {}
    for result in results:
        for key, value in result.items():
            if key in merged and merged[key] is not value:
                raise ValueError(f"{what} {key!r} is registered by two plugins")
            merged[key] = value
    return merged
