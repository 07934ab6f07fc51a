"""A module's logger whose `logging` import waits for its first message.

Modules on the path of every `memvisor run` log only when something goes wrong, yet `import logging` (with
traceback, string and textwrap) is about 9 ms of a boot's imports on a host and a third of a second in the lab
(BENCHMARKS.md). `log = lazy_logger(__name__)` behaves as `logging.getLogger(__name__)` from its first use on.
"""

from typing import Any


class LazyLogger:
    """Forwards every attribute (debug, warning, exception, ...) to `logging.getLogger(name)`."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, attribute: str) -> Any:
        import logging

        return getattr(logging.getLogger(self.name), attribute)


def lazy_logger(name: str) -> LazyLogger:
    return LazyLogger(name)
