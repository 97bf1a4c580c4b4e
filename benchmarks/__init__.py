"""Side-by-side benchmark harness for nbdqcow (issue 6).

``python -m benchmarks.run`` creates fresh images, starts each NBD server in
turn on a Unix socket (``qemu-nbd``, ``nbdkit file`` and ``nbdqcow serve``),
drives it with real clients (``nbdcopy``, ``fio --ioengine=nbd`` and libnbd's
Python bindings) and reports medians, spreads, ratios and the server's CPU
time and peak memory.  See ``benchmarks/README.md``.
"""
