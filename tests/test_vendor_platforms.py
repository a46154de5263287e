"""The Intel GPU (xpu), Gaudi (hpu) and Ascend (npu) platforms, on a machine that has none of them: each is
discovered through its entry point and declines with the reason, without importing its vendor runtime; the
checks their detection is made of, and the device-count check they share with the GPU platforms."""
from __future__ import annotations

import json
import re

import pytest

from conftest import run_python
from kvserve.core.config import build_engine_config
from kvserve.platforms.accelerator import missing_device_nodes, missing_runtime
from kvserve.platforms.xpu.plugin import XpuPlatform
from kvserve.plugins.manager import PluginManager

VENDOR_MODULES = ("intel_extension_for_pytorch", "habana_frameworks", "torch_npu")
DETECT = """
import json, sys
from kvserve.plugins.manager import PluginManager
statuses = {r.name: r.status for r in PluginManager().records}
print(json.dumps({"statuses": statuses, "imported": [m for m in sys.argv[1:] if m in sys.modules]}))
"""
REASONS = {
    "xpu": "unavailable: this torch is built without XPU support",
    "hpu": "unavailable: Intel Gaudi's PyTorch bridge (habana_frameworks) is not installed",
    "npu": "unavailable: torch-npu is not installed (pip install 'kvserve[npu]'",
}


def test_each_declines_with_its_reason_and_imports_no_vendor_runtime(tmp_path):
    found = json.loads(run_python(tmp_path, ["-c", DETECT, *VENDOR_MODULES]).splitlines()[-1])
    for name, reason in REASONS.items():
        assert found["statuses"][name].startswith(reason), found["statuses"]
    assert found["imported"] == []


def test_kvserve_plugins_shows_the_reasons_and_selects_the_cpu(tmp_path):
    listing = run_python(tmp_path, ["-m", "kvserve.core.entrypoints.cli", "plugins"])
    for name, reason in REASONS.items():
        assert any(line.split()[0] == name and reason in line for line in listing.splitlines()), listing
    assert "selected platform: cpu" in listing


@pytest.mark.parametrize("name", sorted(REASONS))
def test_asking_for_one_is_an_error_naming_the_reason(name):
    reason = REASONS[name].removeprefix("unavailable: ")
    with pytest.raises(ValueError, match=re.escape(f"platform '{name}' is unavailable: {reason}")):
        PluginManager().select_platform(name)


def test_detection_reads_the_runtime_and_device_nodes_without_starting_anything(tmp_path):
    assert missing_runtime("json", "json", "") == ""
    assert missing_runtime("kvserve_no_such_runtime", "the runtime", "how") == "the runtime is not installed (how)"
    pattern = str(tmp_path / "hl[0-9]*")
    assert missing_device_nodes("Gaudi device", (pattern,)) == f"no Gaudi device is visible (no device node {pattern})"
    (tmp_path / "hl0").touch()
    assert missing_device_nodes("Gaudi device", (pattern,)) == ""


def test_a_layout_needing_more_devices_than_visible_is_refused_before_start():
    platform = XpuPlatform()   # torch.xpu counts 0 devices here, as on an XPU machine whose devices are hidden
    with pytest.raises(ValueError, match="need 1 xpu devices on this machine, one each, but 0 are visible.*"
                                         "ZE_AFFINITY_MASK"):
        platform.platform_bind_device(0)
    config = build_engine_config(None, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="need 2 xpu devices"):
        platform.platform_update_config(config)
