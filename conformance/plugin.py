"""The conformance suite's pytest plugin (entry point ``pytest11``): the ``--kvserve-platform`` option. Loaded by
every pytest run where kvserve is installed, so it imports nothing heavy and adds no fixtures of its own."""
from __future__ import annotations

OPTION = "--kvserve-platform"


def pytest_addoption(parser) -> None:
    parser.getgroup("kvserve").addoption(
        OPTION, metavar="NAME", default=None,
        help="the platform plugin that kvserve's conformance suite (--pyargs kvserve.conformance) checks")
