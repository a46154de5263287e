"""Start-up stages announce themselves once they run past the threshold, and a bad threshold never stops a start."""
from __future__ import annotations

import logging
import re

from kvserve.plugins.stages import LOG_AFTER_ENV, log_after, stage


def test_a_stage_past_the_threshold_is_announced_then_timed(monkeypatch, caplog):
    caplog.set_level(logging.INFO, "kvserve")
    monkeypatch.setenv(LOG_AFTER_ENV, "0")
    with stage("compiling"):
        pass
    monkeypatch.setenv(LOG_AFTER_ENV, "600")
    with stage("reading"):
        pass
    assert re.search(r"compiling \.\.\.\n.*compiling: done in \d+\.\ds", caplog.text), caplog.text
    assert "reading" not in caplog.text


def test_an_unreadable_threshold_warns_and_keeps_the_default(monkeypatch, caplog):
    monkeypatch.setenv(LOG_AFTER_ENV, "soon")
    assert log_after() == 2.0
    assert f"{LOG_AFTER_ENV} must be a number of seconds, got 'soon'" in caplog.text
