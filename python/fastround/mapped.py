"""Handing back the pages of memory-mapped checkpoint weights once they have been read.

transformers loads a safetensors checkpoint as one private file mapping that every weight points into, so a
weight's pages join the process's RSS the first time they are read (quantizing a layer, writing a tensor to the
output) and stay there until the last weight of the file is gone: RTN would end with the whole checkpoint
resident although each weight is needed once. Dropping the pages from this process (MADV_DONTNEED) leaves them
in the page cache, and a later read faults them in again with the same bytes, as long as no page of the range
holds a private copy (a weight written in place): those ranges are left alone. Linux only; elsewhere, or where
/proc cannot be read, nothing is released."""

from __future__ import annotations

import bisect
import ctypes
import logging
import os
import sys
from collections.abc import Iterable

import torch

logger = logging.getLogger("fastround")

_MADV_DONTNEED = 4
_SWAPPED = 1 << 62  # bit 63 (present) is the sign bit of the int64 entry
_FILE_PAGE = 1 << 61  # a page of the file (or shared memory), not this process's private copy


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of every mapping of a regular file in this process."""
    spans = []
    with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or parts[4] == "0" or not parts[5].startswith("/"):
                continue  # anonymous memory, heap, stack, vdso
            lo, hi = parts[0].split("-")
            spans.append((int(lo, 16), int(hi, 16)))
    return spans


def _has_private_copy(pagemap: int, first_page: int, pages: int) -> bool:
    """Whether any page of the range is this process's own copy (anonymous or swapped), per /proc/self/pagemap."""
    raw = os.pread(pagemap, pages * 8, first_page * 8)
    if len(raw) != pages * 8:
        return True
    entries = torch.frombuffer(bytearray(raw), dtype=torch.int64)  # [pages] one 64-bit entry each
    in_use = entries.lt(0) | entries.bitwise_and(_SWAPPED).ne(0)
    private = entries.bitwise_and(_FILE_PAGE).eq(0)
    return bool((in_use & private).any())


Span = tuple[int, int]  # [start, end) byte addresses


def span(tensor: torch.Tensor) -> Span | None:
    """The bytes a contiguous CPU tensor occupies; None for other tensors (nothing to release)."""
    if tensor.device.type != "cpu" or not tensor.numel() or not tensor.is_contiguous():
        return None
    start = tensor.data_ptr()
    return start, start + tensor.numel() * tensor.element_size()


def release_file_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Drop from this process the whole pages of each CPU tensor that lies in a file mapping; returns the bytes
    released. Reading such a tensor again still gives its bytes (from the page cache or the file)."""
    return PageReleaser()(s for s in map(span, tensors) if s is not None)


class PageReleaser:
    """release_file_pages for address ranges taken earlier (the tensors may be gone by then), reading the
    process's mappings once: for one release per layer. Whatever lies at an address when it is released is
    checked again through /proc/self/pagemap, so a stale mapping list never drops a private page."""

    def __init__(self) -> None:
        self._starts: list[int] | None = None
        self._ends: list[int] = []

    def _load(self) -> bool:
        if self._starts is None:
            try:
                mappings = sorted(_file_mappings())
            except OSError as exc:
                logger.debug("cannot read this process's mappings (%s); keeping mapped pages", exc)
                mappings = []
            self._starts = [lo for lo, _ in mappings]
            self._ends = [hi for _, hi in mappings]
        return bool(self._starts)

    def _in_file_mapping(self, start: int, end: int) -> bool:
        assert self._starts is not None
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and end <= self._ends[i]

    def mapped(self, tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors that lie in a file mapping (holding these costs no memory of the process's own)."""
        picked = []
        for t in tensors:
            s = span(t)
            if s is not None and self._load() and self._in_file_mapping(*s):
                picked.append(t)
        return picked

    def __call__(self, spans: Iterable[Span]) -> int:
        if not sys.platform.startswith("linux"):
            return 0
        spans = list(spans)
        if not spans or not self._load():
            return 0
        page = os.sysconf("SC_PAGE_SIZE")
        try:
            pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
        except OSError as exc:
            logger.debug("cannot read /proc/self/pagemap (%s); keeping mapped pages", exc)
            return 0
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        released = 0
        try:
            for start, end in spans:
                if not self._in_file_mapping(start, end):
                    continue
                first, last = -(-start // page), end // page  # whole pages only: the neighbours' bytes stay
                if last <= first or _has_private_copy(pagemap, first, last - first):
                    continue
                length = (last - first) * page
                if madvise(first * page, length, _MADV_DONTNEED) == 0:
                    released += length
        finally:
            os.close(pagemap)
        return released


__all__ = ["PageReleaser", "Span", "release_file_pages", "span"]
