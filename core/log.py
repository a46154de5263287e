"""The kvserve logger, printed to stderr at INFO like vLLM's."""
from __future__ import annotations

import logging

logger = logging.getLogger("kvserve")


def init_logging() -> None:
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
