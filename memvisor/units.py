"""Sizes as people write them: `512M`, `4G`, `2M`, plain bytes.

Binary suffixes (K = 1024). `parse_size` accepts an optional trailing `B`/`iB` ("512MiB"); `format_size`
prints the shortest exact form ("4G", "1536M", "4097K"), or bytes.
"""

import re

from memvisor.errors import UsageError

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int, what: str = "size") -> int:
    """Parse `text` ("512M", "4G", "1048576") into bytes; raise UsageError naming `what` otherwise."""
    if isinstance(text, int):
        if text < 0:
            raise UsageError(f"{what} must not be negative, got {text}")
        return text
    match = _SIZE_RE.match(text)
    if match is None:
        raise UsageError(
            f"{what} {text!r} is not a size: write a whole number with an optional suffix K, M, G or T, e.g. 512M or 4G"
        )
    return int(match.group(1)) * _SUFFIXES[match.group(2).upper()]


def format_size(size: int) -> str:
    """Format bytes with the largest binary suffix that divides them exactly ("4G", "1536M", "123")."""
    if size < 0:
        return "-" + format_size(-size)
    for suffix in ("T", "G", "M", "K"):
        unit = _SUFFIXES[suffix]
        if size >= unit and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)
