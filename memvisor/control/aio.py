"""`asyncio` for the QMP server, loaded without `ssl`.

asyncio imports ssl (and with it _ssl and OpenSSL) when it is first imported, only to offer TLS transports, which a
QMP unix socket never uses: about 14 ms of the server's import on a host, half a second of start-up in the lab
(BENCHMARKS.md). So while asyncio loads, `import ssl` fails, which asyncio takes as "no TLS here" (its ssl is then
None for this process); afterwards ssl imports as usual for anyone else. When asyncio or ssl is already loaded,
this is a plain `import asyncio`.
"""

import sys

_without_ssl = "asyncio" not in sys.modules and "ssl" not in sys.modules
if _without_ssl:
    sys.modules["ssl"] = None  # type: ignore[assignment]  # None in sys.modules: the import raises ImportError
try:
    import asyncio
finally:
    if _without_ssl:
        del sys.modules["ssl"]

__all__ = ["asyncio"]
