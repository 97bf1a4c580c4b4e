"""Profile ``nbdqcow serve`` under one benchmark workload with cProfile.

``python -m benchmarks.profile [--workload randread-qd32] [--format qcow2]
[--seconds 5] [--out FILE.prof]`` creates a filled image, serves it with the
server running under ``python -m cProfile``, drives it with the workload's
real client, stops the server with SIGTERM (it exits normally, so cProfile
writes its data) and prints the top functions by own time and by
cumulative time.  Open ``--out`` with ``python -m pstats`` or snakeviz for
more.  cProfile adds overhead per Python call, so the ranking, not the
absolute time, is what to read; py-spy (``py-spy record --pid``) gives an
unbiased sampling view when it is installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import pstats
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks import images
from benchmarks.config import QUICK, parse_size
from benchmarks.servers import RunningServer, nbdqcow_env, uri
from benchmarks.workloads import WORKLOADS, Client

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    names = [w.name for w in WORKLOADS]
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    p.add_argument("--workload", default="randread-qd32", choices=names)
    p.add_argument("--format", default="qcow2", choices=["qcow2", "raw"])
    p.add_argument("--size", type=parse_size, default=QUICK.size)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", type=Path, help="keep the cProfile data here")
    args = p.parse_args(argv)
    w = next(x for x in WORKLOADS if x.name == args.workload)
    params = dataclasses.replace(QUICK, mode="profile", size=args.size, seconds=args.seconds)
    with tempfile.TemporaryDirectory(prefix="nbdqcow-profile-") as wd:
        work = Path(wd)
        source = images.create_filled(work / "data.raw", "raw", params.size)
        if w.image == "data":
            image = images.create_filled(work / f"data.{args.format}", args.format, params.size)
        else:
            size = params.size if w.image == "empty" else params.sparse_size
            image = images.create_empty(work / f"fresh.{args.format}", args.format, size)
        prof = args.out or work / "server.prof"
        sock = work / "nbd.sock"
        server = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "nbdqcow", "serve"]
        server += ["--socket", str(sock), "--format", args.format]
        if not w.writes:
            server.append("--read-only")
        server.append(str(image))
        with RunningServer(server, sock, work / "server.log", env=nbdqcow_env()) as srv:
            images.warm(image)
            sample = w.run(Client(uri(sock), params, work, source, params.size))
            srv.stop()  # SIGTERM: a clean exit, so cProfile writes its file
        print(f"{w.name} on nbdqcow/{args.format} under cProfile: {sample.value:.1f} {w.unit}")
        for key in ("tottime", "cumulative"):
            out = io.StringIO()
            pstats.Stats(str(prof), stream=out).sort_stats(key).print_stats(args.top)
            print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
