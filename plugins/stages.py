"""Start-up stages that may keep a user waiting, announced: the core, platforms and kernels say the same way what
they are doing, so that a first start (kernels compiling, weights read from a slow disk, graphs captured) is not
a silent minute."""
from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator

LOG_AFTER_ENV = "KVSERVE_STAGE_LOG_AFTER"   # seconds a stage runs before it is announced (default 2)
logger = logging.getLogger("kvserve")


def log_after() -> float:
    text = os.environ.get(LOG_AFTER_ENV, "2")
    try:
        return float(text)
    except ValueError:   # a start must not fail, nor its kernels give way, for how it is announced
        logger.warning("%s must be a number of seconds, got %r; using 2", LOG_AFTER_ENV, text)
        return 2.0


@contextmanager
def stage(what: str) -> Iterator[None]:
    """Log ``what`` (e.g. "building the CPU kernels") once it has run for ``KVSERVE_STAGE_LOG_AFTER`` seconds, and
    then how long it took; a stage that ends sooner stays silent. Platforms and kernels use it for their own
    slow start-up work, as the core does for reading weights."""
    after, start = log_after(), time.perf_counter()
    announced = threading.Event()

    def announce() -> None:
        announced.set()
        logger.info("%s ...", what)

    timer = threading.Timer(after, announce)
    timer.daemon = True
    if after > 0:
        timer.start()
    else:
        announce()
    try:
        yield
    finally:
        timer.cancel()
        if announced.is_set():
            logger.info("%s: done in %.1fs", what, time.perf_counter() - start)
