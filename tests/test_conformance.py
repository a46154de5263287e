"""The plugin conformance suite, run as vendors run it (``kvserve conformance NAME`` in a process of its own): the
CPU platform and the template plugin of examples/vendor_plugin pass it, skipping with reasons what they leave to
the references; a platform with two faults fails exactly the checks of those two."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import PLUGIN_SOURCES, install_plugins, run_python

pytestmark = pytest.mark.slow

TEMPLATE = Path(__file__).resolve().parents[1] / "examples" / "vendor_plugin"
CONFORMANCE = ["-m", "kvserve.core.entrypoints.cli", "conformance"]


@pytest.fixture(scope="module")
def template_site(tmp_path_factory) -> Path:
    """The template plugin, and the faulty platform built on it, installed as a vendor installs a plugin."""
    return install_plugins(tmp_path_factory.mktemp("template"), [TEMPLATE, PLUGIN_SOURCES / "faulty_platform"])


def outcomes(report: str) -> dict[str, int]:
    summary = report.strip().splitlines()[-1]
    return {word: int(count) for count, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}


def test_the_cpu_platform_passes(tmp_path):
    report = run_python(tmp_path, [*CONFORMANCE, "cpu"])
    counts = outcomes(report)
    assert counts.get("passed", 0) >= 40 and set(counts) <= {"passed", "skipped"}, report
    assert "test_graph_replay_gives_eager_tokens" not in report   # the CPU platform replays graphs: not skipped


def test_the_template_plugin_passes_and_says_what_it_leaves_to_the_references(template_site):
    report = run_python(template_site, [*CONFORMANCE, "example"])
    counts = outcomes(report)
    assert counts.get("passed", 0) >= 15 and set(counts) <= {"passed", "skipped"}, report
    for reason in ("does not list float16 among its supported dtypes", "keeps the torch reference of rms_norm",
                   "runs w8a8_int8 on the portable reference", "captures no graphs for this model"):
        assert reason in report, report


def test_a_faulty_platform_fails_exactly_the_checks_it_breaks(template_site):
    report = run_python(template_site, [*CONFORMANCE, "faulty"], returncode=1)
    failed = set(re.findall(r"^FAILED \S+::(\w+)(?:\[[^\]]*\])?", report, re.MULTILINE))
    assert {"test_attention_matches_the_reference", "test_fp8_caches_attend_what_they_hold",
            "test_fused_op_matches_the_reference"} <= failed, report
    assert not failed & {"test_memory_info_is_sane", "test_collectives_between_two_ranks",
                         "test_quantized_matmul_matches_the_reference"}, report
    assert "rms_norm" in "".join(re.findall(r"^FAILED \S+test_fused_op\S+", report, re.MULTILINE))


def test_an_unknown_platform_is_an_error_before_any_check(tmp_path):
    report = run_python(tmp_path, [*CONFORMANCE, "nosuch"], with_stderr=True, returncode=2)
    assert "error: platform 'nosuch' is not installed; found: cpu (available)" in report
    assert "passed" not in report
