"""Progress bars for long work (tqdm), erased when the work fails so an error stays one clean line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm


@contextmanager
def progress_bar(total: int | None, description: str, unit: str = "it", *, enabled: bool = True) -> Iterator[tqdm]:
    bar = tqdm(total=total, desc=description, unit=unit, disable=not enabled, dynamic_ncols=True)
    try:
        yield bar
    except BaseException:
        bar.leave = False  # erase the bar: the error message that follows is the last word
        raise
    finally:
        bar.close()
