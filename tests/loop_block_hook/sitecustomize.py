"""Test-only: block a serving process's event loop on SIGUSR2 (tests/test_loop_watchdog.py).

Loaded only when a test puts this directory on PYTHONPATH and sets
OCSP_TEST_BLOCK_LOOP_ON_SIGUSR2; it is not part of the package, so no production
process can be made to block this way. It wraps ``uvloop.run`` (how ``serve`` runs its
loop, responder/cli.py) without touching the code under test, so the tests also run
against code from before the watchdog. Modes:

- ``sleep``: ``time.sleep`` in the loop (a deadlock, a blocking call: the GIL is free);
- ``hold-gil``: libc ``sleep`` called through ``ctypes.PyDLL``, which keeps the GIL (a
  C-level hang: no other thread of the process runs either).
"""

from __future__ import annotations

import os

MODE = os.environ.get("OCSP_TEST_BLOCK_LOOP_ON_SIGUSR2")

if MODE:
    import asyncio
    import ctypes
    import signal
    import time
    from collections.abc import Coroutine
    from typing import Any

    import uvloop

    def _block() -> None:
        print(f"test hook: blocking the event loop of pid {os.getpid()} ({MODE})", flush=True)
        if MODE == "hold-gil":
            ctypes.PyDLL(None).sleep(600)
        else:
            time.sleep(600)

    _run = uvloop.run

    def _run_with_hook(main: Coroutine[Any, Any, Any], **kwargs: Any) -> Any:
        async def hooked() -> Any:
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, _block)
            return await main

        return _run(hooked(), **kwargs)

    uvloop.run = _run_with_hook
