"""A helper for tests whose callers may meet an expected error."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def outcome(call: Awaitable[T], *errors: type[BaseException]) -> T | BaseException:
    """What `call` returned, or the exception it raised if it is one of `errors`."""
    try:
        return await call
    except errors as exc:
        return exc
