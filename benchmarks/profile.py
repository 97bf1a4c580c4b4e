"""Profile ``nbdqcow serve`` under one benchmark workload with cProfile.

``python -m benchmarks.profile [--workload randread-qd32] [--format qcow2]
[--seconds 5] [--out FILE.prof]`` creates a filled image, serves it with the
server running under ``python -m cProfile``, drives it with the workload's
real client, stops the server with SIGTERM (it exits normally, so cProfile
writes its data) and prints the top functions by own time and by
cumulative time.  Open ``--out`` with ``python -m pstats`` or snakeviz for
more.  cProfile adds overhead per Python call, so the ranking, not the
absolute time, is what to read.

``--py-spy`` samples the unmodified server with py-spy instead (``pip install
py-spy``; needs ptrace, as root here) and prints the functions with the most
samples, on-CPU only: own samples ("self") and samples anywhere on the stack
("inclusive").
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import pstats
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from benchmarks import images
from benchmarks.config import QUICK, parse_size
from benchmarks.servers import RunningServer, nbdqcow_env, uri
from benchmarks.workloads import WORKLOADS, Client

__all__ = ["main", "summarize_stacks"]


def summarize_stacks(collapsed: str, top: int) -> str:
    """Top frames of py-spy's collapsed stacks (``frame;frame;... COUNT``)."""
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            anywhere[frame] += n
    if total == 0:
        return "py-spy recorded no samples"
    lines = [f"{total} on-CPU samples", "", "self:"]
    lines += [f"{100 * n / total:6.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["", "inclusive (nbdqcow frames):"]
    ours = [(f, n) for f, n in anywhere.most_common() if "nbdqcow/" in f]
    lines += [f"{100 * n / total:6.1f}%  {f}" for f, n in ours[:top]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    names = [w.name for w in WORKLOADS]
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    p.add_argument("--workload", default="randread-qd32", choices=names)
    p.add_argument("--format", default="qcow2", choices=["qcow2", "raw"])
    p.add_argument("--size", type=parse_size, default=QUICK.size)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", type=Path, help="keep the cProfile data (or py-spy stacks) here")
    p.add_argument("--py-spy", action="store_true", help="sample with py-spy, not cProfile")
    args = p.parse_args(argv)
    w = next(x for x in WORKLOADS if x.name == args.workload)
    params = dataclasses.replace(QUICK, mode="profile", size=args.size, seconds=args.seconds)
    with tempfile.TemporaryDirectory(prefix="nbdqcow-profile-") as wd:
        work = Path(wd)
        source = images.create_filled(work / "data.raw", "raw", params.size)
        if w.image in ("data", "seq"):
            image = images.create_filled(work / f"data.{args.format}", args.format, params.size)
            size = params.size
        elif w.image == "huge":
            size = params.huge_size
            image = images.create_spread(work / f"huge.{args.format}", args.format, size)
        else:
            size = params.size if w.image == "empty" else params.sparse_size
            image = images.create_empty(work / f"fresh.{args.format}", args.format, size)
        sock = work / "nbd.sock"
        client = Client(uri(sock), params, work, source, size)
        serve = ["--socket", str(sock), "--format", args.format]
        serve += [] if w.writes else ["--read-only"]
        serve.append(str(image))
        if args.py_spy:
            stacks = args.out or work / "stacks.txt"
            server = [sys.executable, "-m", "nbdqcow", "serve", *serve]
            with RunningServer(server, sock, work / "server.log", env=nbdqcow_env()) as srv:
                images.warm(image)
                spy_argv = ["py-spy", "record", "--pid", str(srv.pid), "--rate", "250"]
                spy_argv += ["--duration", str(max(1, round(args.seconds)))]
                spy_argv += ["--format", "raw", "--output", str(stacks), "--nonblocking"]
                spy = subprocess.Popen(
                    spy_argv,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                try:
                    sample = w.run(client)
                finally:
                    spy.wait(timeout=args.seconds + 60)
            print(f"{w.name} on nbdqcow/{args.format} under py-spy: {sample.value:.1f} {w.unit}")
            print(summarize_stacks(stacks.read_text(), args.top))
            return 0
        prof = args.out or work / "server.prof"
        server = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "nbdqcow", "serve"]
        server += serve
        with RunningServer(server, sock, work / "server.log", env=nbdqcow_env()) as srv:
            images.warm(image)
            sample = w.run(client)
            srv.stop()  # SIGTERM: a clean exit, so cProfile writes its file
        print(f"{w.name} on nbdqcow/{args.format} under cProfile: {sample.value:.1f} {w.unit}")
        for key in ("tottime", "cumulative"):
            out = io.StringIO()
            pstats.Stats(str(prof), stream=out).sort_stats(key).print_stats(args.top)
            print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
