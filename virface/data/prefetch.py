"""Batches ready on the device before the step asks for them.

On CUDA a background thread takes the loader's next batches, pins them and copies them to the
GPU with non-blocking copies on a side stream, ``depth`` batches ahead, so the step never waits
for collation or the host-to-device copy (in-memory data are collated in this process, image
files by the loader's workers). The step's stream waits for each copy's event, and the tensors
are marked as used on it, so their memory is not reused too early. Elsewhere the loader's
batches are passed through: on a CPU the step and the collation share the same cores.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator

import torch

_DONE = object()


class DevicePrefetcher:
    """Iterates ``loader``'s (images, labels, skipped) batches with images and labels on
    ``device``; ``len()`` is the loader's."""

    def __init__(self, loader: Iterable, device: torch.device, depth: int = 2):
        self.loader, self.device, self.depth = loader, torch.device(device), depth

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        if self.device.type != "cuda":
            yield from self.loader
            return
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        side = torch.cuda.Stream(device=self.device)

        def produce() -> None:
            try:
                with torch.cuda.device(self.device):
                    for images, labels, skipped in self.loader:
                        if stop.is_set():
                            return
                        with torch.cuda.stream(side):
                            images = images.pin_memory().to(self.device, non_blocking=True)
                            labels = labels.pin_memory().to(self.device, non_blocking=True)
                            copied = torch.cuda.Event()
                            copied.record(side)
                        ready.put((images, labels, skipped, copied))
            except BaseException as exc:        # surfaces in the training thread
                ready.put(exc)
                return
            ready.put(_DONE)

        worker = threading.Thread(target=produce, name="virface-prefetch", daemon=True)
        worker.start()
        try:
            while True:
                item = ready.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                images, labels, skipped, copied = item
                current = torch.cuda.current_stream(self.device)
                current.wait_event(copied)
                images.record_stream(current)
                labels.record_stream(current)
                yield images, labels, skipped
        finally:
            stop.set()
            while worker.is_alive():            # let the producer see the flag and finish
                try:
                    ready.get(timeout=0.1)
                except queue.Empty:
                    pass
