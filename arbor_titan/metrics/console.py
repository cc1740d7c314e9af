"""Console output for the `arbor_titan` logger tree: `[rank0] HH:MM:SS message`."""

import logging
import sys

LOGGER_NAME = "arbor_titan"


class _ConsoleHandler(logging.StreamHandler):
    """Marks the handler this module installed, so a second setup replaces it."""


def setup_console_logging(rank: int, show: bool) -> logging.Logger:
    """Send `arbor_titan.*` records to stdout, tagged with `rank`; idempotent.

    Ranks that do not `show` still print warnings and errors, so a failure on any rank is seen.
    """
    logger = logging.getLogger(LOGGER_NAME)
    for handler in [h for h in logger.handlers if isinstance(h, _ConsoleHandler)]:
        logger.removeHandler(handler)
    handler = _ConsoleHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[rank{rank}] %(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if show else logging.WARNING)
    logger.propagate = False
    return logger
