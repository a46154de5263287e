"""kvserve installs as one import package, with the in-tree platforms on the public entry points."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_only_the_kvserve_package(tmp_path):
    source = tmp_path / "src"   # a copy, so the build leaves nothing in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("kvserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names}
    assert top_level == {"kvserve", next(t for t in top_level if t.endswith(".dist-info"))}
    for sub in ("core", "plugins", "platforms", "kernels_cpu", "kernels_cuda", "kernels_rocm"):
        assert f"kvserve/{sub}/__init__.py" in names
    assert "kvserve/platforms/cpu/plugin.py" in names and not any(n.startswith("kvserve/tests/") for n in names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[kvserve.platforms]\ncpu = kvserve.platforms.cpu.plugin" in entry_points
    assert "kvserve = kvserve.core.entrypoints.cli:main" in entry_points
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    extras = {line.split(": ")[1] for line in metadata.splitlines() if line.startswith("Provides-Extra")}
    assert {"cpu", "cuda", "rocm", "xpu", "npu", "test"} <= extras
    assert "Requires-Dist: torch==2.13.0" in metadata
