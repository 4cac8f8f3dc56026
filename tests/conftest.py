"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from helpers import engines


@pytest.fixture
def interrupt_engine(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], Callable[[], None]]:
    """``interrupt_engine(n)`` makes the local engine raise KeyboardInterrupt before its ``n``-th batch
    (0-based), as a user's Ctrl-C would; it returns a function that restores the real engine."""
    real = engines.iter_embeddings

    def patch(n: int) -> Callable[[], None]:
        def interrupted(*args, **kwargs):
            for i, batch in enumerate(real(*args, **kwargs)):
                if i == n:
                    raise KeyboardInterrupt
                yield batch

        monkeypatch.setattr(engines, "iter_embeddings", interrupted)
        return lambda: monkeypatch.setattr(engines, "iter_embeddings", real)

    return patch
