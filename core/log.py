"""The kvserve logger, printed to stderr at INFO like vLLM's."""
from __future__ import annotations

import logging

logger = logging.getLogger("kvserve")


def init_logging(where: str = "") -> None:
    """Log to stderr; ``where`` follows the logger's name in each line (a replica's process says which)."""
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"%(levelname)s %(asctime)s %(name)s{where}: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
