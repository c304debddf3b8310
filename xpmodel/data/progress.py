"""A rich progress bar for `prepare`, handed to it as its `progress` callback.

    with tokenizing_progress() as progress:
        path = prepare("shakespeare", tokenizer, progress=progress)

The bar counts source bytes read (not tokens), since that is what is known
in advance.
"""

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


@contextmanager
def tokenizing_progress(
    description: str = "tokenizing", console: Console | None = None
) -> Iterator[Callable[[int, int], None]]:
    """A callback(bytes_done, bytes_total) that drives a progress bar while the
    block runs. The bar appears at the first call, so a corpus whose token file
    is already cached (prepare then reads nothing) shows none."""
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    shown = {}

    def update(bytes_done: int, bytes_total: int) -> None:
        if not shown:
            shown["bar"] = Progress(*columns, console=console, transient=False)
            shown["bar"].start()
            shown["task"] = shown["bar"].add_task(description, total=None)
        shown["bar"].update(shown["task"], completed=bytes_done, total=bytes_total)

    try:
        yield update
    finally:
        if shown:
            shown["bar"].stop()
