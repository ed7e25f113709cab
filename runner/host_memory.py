"""Transparent huge pages for torch's large CPU tensors, asked for before torch is imported.

On a CPU, the VAE encoder works on activations of [1, 128, 912000] float32 (one 19 s piece of the
source at 48 kHz: 467 MB), and each element-wise step of its Snake activations allocates a fresh
one. Allocations that large come from the kernel as fresh 4 KiB pages, about 114,000 page faults
each before any arithmetic. torch's CPU allocator can ask for 2 MiB huge pages instead
(`THP_MEM_ALLOC_ENABLE`, read when torch first allocates): on the 2-core development machine a demo
job on a 30 s source took about a third less CPU time (docs/PERFORMANCE.md, "The demo model on a
CPU"). It needs
the kernel's consent (/sys/kernel/mm/transparent_hugepage/enabled: madvise or always); with never
it changes nothing. An operator's own value (0 turns it off) is kept.
"""
from __future__ import annotations

import os

VARIABLE = "THP_MEM_ALLOC_ENABLE"


def ask_for_huge_pages() -> None:
    os.environ.setdefault(VARIABLE, "1")
