"""Keep freed host memory in the process while training on the CPU.

Every training step allocates and frees the same large buffers: the [L, B, F] pre-activations,
the support masks, the decoder's gradients, tens of MB each at ordinary shapes. glibc hands
blocks above its mmap threshold (dynamic, at most 32 MB) straight back to the kernel on
``free`` and trims the top of its heap past 128 KB, so each step maps those pages again and the
kernel zero-fills them: on the L=12, d=256, F=2048, batch-512 step that was ~190 ms of system
time per ~850 ms step on one thread. Raising both thresholds lets the heap keep those pages
for the next step; the process's resident size then stays at its high-water mark (+4% on that
step), which a training loop reaches every step anyway.

Process-wide and one-way, so only the training runner calls it (``retain_host_memory``); a
no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# blocks above this still come from mmap and go back to the kernel when freed (e.g. a
# checkpoint's state dict), so a one-off giant allocation does not pin memory for the run
MMAP_THRESHOLD = 256 * 2**20
_done = False


def retain_freed_memory() -> bool:
    """Tell glibc to keep freed blocks up to ``MMAP_THRESHOLD`` and never trim its heap.
    Returns whether the settings took effect (False off Linux/glibc)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl has no mallopt knobs)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok
