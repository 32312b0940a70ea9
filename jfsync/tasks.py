"""Ending background tasks at shutdown without letting one failure stop the rest.

:func:`cancel_and_wait` cancels tasks, waits for every one of them to end and logs (with its
traceback) each that had failed instead of raising it: a shutdown that raised half-way would
leave connections open and, with them, a process that does not exit. The caller's own
cancellation is still passed on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], logger: logging.Logger) -> None:
    """Cancel ``tasks``, wait for all of them, and log those that ended with an error."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    if not pending:
        return
    results = await asyncio.gather(*pending, return_exceptions=True)
    for task, result in zip(pending, results, strict=True):
        if isinstance(result, Exception):
            logger.error("task %s had failed", task.get_name(), exc_info=result)
    current = asyncio.current_task()
    if current is not None and current.cancelling():
        raise asyncio.CancelledError
