"""``nbdqcow serve --config exports.toml``: exports, ACLs and SIGHUP reload,
on the real command with real clients."""

from __future__ import annotations

import http.client
import signal
import socket
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.nbdclient import NbdClient, OptionError
from tests.ops.conftest import Server, Spawn, free_port, libnbd_snippet, make_image, run

# proto.md "Option reply types"
NBD_REP_ERR_POLICY = 2**31 + 2
NBD_REP_ERR_UNKNOWN = 2**31 + 6

LIBNBD_GO = """
import errno, json, sys, nbd
h = nbd.NBD()
try:
    h.connect_uri(sys.argv[1])
except nbd.Error as e:
    print(json.dumps({"connected": False, "errno": errno.errorcode.get(e.errno),
                      "error": str(e)}))
else:
    print(json.dumps({"connected": True, "size": h.get_size()}))
    h.shutdown()
"""


def write_config(path: Path, port: int, exports: dict[str, dict[str, str]]) -> None:
    lines = ["[server]", f'listen = ["127.0.0.1:{port}"]', 'admin = "unix:admin.sock"', ""]
    for name, keys in exports.items():
        lines.append(f"[exports.{name}]")
        lines += [f"{k} = {v}" for k, v in keys.items()]
        lines.append("")
    path.write_text("\n".join(lines))


def go(port: int, name: str) -> NbdClient:
    c = NbdClient.connect_tcp("127.0.0.1", port)
    c.handshake()
    try:
        c.go(name)
    except BaseException:
        c.close()
        raise
    return c


def refusal(port: int, name: str) -> int:
    try:
        go(port, name).close()
    except OptionError as e:
        return e.reply
    raise AssertionError(f"export {name!r} was not refused")


def test_two_exports_and_acl_refusal(tmp_path: Path, spawn: Spawn) -> None:
    make_image(tmp_path / "lab.qcow2", pattern=0x11)
    make_image(tmp_path / "secret.raw", fmt="raw", size="1M")
    port = free_port()
    cfg = tmp_path / "exports.toml"
    write_config(cfg, port, {
        "lab": {"image": '"lab.qcow2"', "allow": '["127.0.0.0/8"]'},
        "secret": {"image": '"secret.raw"', "allow": '["10.0.0.0/8", "fd00::/8"]'},
    })
    s = spawn("--config", str(cfg), ready=("127.0.0.1", port))
    # our client: the refusal is an option error reply, not a hang-up
    assert refusal(port, "secret") & 2**31
    c = go(port, "lab")
    assert c.read(0, 4096) == b"\x11" * 4096
    c.disconnect()
    c.close()
    # libnbd: refused with a reply it can report ...
    r = libnbd_snippet(LIBNBD_GO, f"nbd://127.0.0.1:{port}/secret")
    assert r["connected"] is False and "policy" in str(r["error"]), r
    # ... and the allowed export works
    r = libnbd_snippet(LIBNBD_GO, f"nbd://127.0.0.1:{port}/lab")
    assert r == {"connected": True, "size": 16 << 20}
    # the refused export is not even listed to this client
    with NbdClient.connect_tcp("127.0.0.1", port) as lc:
        lc.handshake()
        assert [n for n, _ in lc.list_exports()] == ["lab"]
    assert s.stop() == 0


def test_acl_refusal_is_err_policy(tmp_path: Path, spawn: Spawn) -> None:
    make_image(tmp_path / "secret.raw", fmt="raw", size="1M")
    port = free_port()
    cfg = tmp_path / "exports.toml"
    write_config(cfg, port, {"secret": {"image": '"secret.raw"', "allow": '["10.0.0.0/8"]'}})
    spawn("--config", str(cfg), ready=("127.0.0.1", port))
    assert refusal(port, "secret") == NBD_REP_ERR_POLICY
    r = libnbd_snippet(LIBNBD_GO, f"nbd://127.0.0.1:{port}/secret")
    assert "server policy prevents" in str(r["error"]), r  # libnbd's words for ERR_POLICY


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(self.path)


def metric_exports(admin: Path) -> set[str]:
    """The export labels in /metrics, scraped over the admin Unix socket."""
    conn = _UnixHTTPConnection(str(admin))
    conn.request("GET", "/metrics")
    body = conn.getresponse().read().decode()
    conn.close()
    return {s.labels["export"] for m in text_string_to_metric_families(body)
            for s in m.samples if "export" in s.labels}


def sighup_and_wait(s: Server, text: str) -> str:
    before = s.log().count(text)
    s.proc.send_signal(signal.SIGHUP)
    return s.wait_log(text, count=before + 1)


def test_sighup_reload_add_remove_change(tmp_path: Path, spawn: Spawn) -> None:
    make_image(tmp_path / "old.qcow2", pattern=0x22)
    make_image(tmp_path / "new.qcow2", pattern=0x33)
    make_image(tmp_path / "lab.qcow2")
    port = free_port()
    cfg = tmp_path / "exports.toml"
    write_config(cfg, port, {
        "lab": {"image": '"lab.qcow2"', "description": '"before"'},
        "old": {"image": '"old.qcow2"'},
    })
    s = spawn("--config", str(cfg), ready=("127.0.0.1", port))
    held = go(port, "old")  # a client of the export about to be removed
    held.write(65536, b"\x44" * 4096)

    write_config(cfg, port, {
        "lab": {"image": '"lab.qcow2"', "description": '"after"'},
        "new": {"image": '"new.qcow2"'},
    })
    log = sighup_and_wait(s, "reloaded ")
    assert "added new; removed old; changed lab" in log

    # the connected client finishes its work on the removed export
    assert held.read(0, 4096) == b"\x22" * 4096
    held.write(8192, b"\x55" * 4096)
    held.flush()
    assert "old" in metric_exports(tmp_path / "admin.sock")
    held.disconnect()
    held.close()
    deadline = time.monotonic() + 10  # its series go once its last client has left
    while "old" in metric_exports(tmp_path / "admin.sock"):
        assert time.monotonic() < deadline, "metrics of the removed export stayed"
        time.sleep(0.05)
    # new clients: the removed export is gone, the new one is there
    assert refusal(port, "old") == NBD_REP_ERR_UNKNOWN
    c = go(port, "new")
    assert c.read(0, 4096) == b"\x33" * 4096
    c.disconnect()
    c.close()
    with NbdClient.connect_tcp("127.0.0.1", port) as lc:
        lc.handshake()
        assert sorted(lc.list_exports()) == [("lab", "after"), ("new", "")]

    # a broken file on reload: one error line, the running config stays
    cfg.write_text(cfg.read_text() + "\n[exports.bad]\nimage = 42\n")
    log = sighup_and_wait(s, "reload of ")
    errors = [line for line in log.splitlines() if "reload of " in line]
    assert len(errors) == 1 and "exports.bad.image" in errors[0], errors
    assert "keeping the running configuration" in errors[0]
    go(port, "new").close()
    # an image that does not open is as bad as a malformed file
    write_config(cfg, port, {"lab": {"image": '"lab.qcow2"'},
                             "gone": {"image": '"missing.qcow2"'}})
    log = sighup_and_wait(s, "reload of ")
    go(port, "new").close()

    assert s.stop() == 0
    assert "Traceback" not in s.log()
    # the removed export's writes reached the image, which is clean
    run(["qemu-img", "check", str(tmp_path / "old.qcow2")])
    r = run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x55 8k 4k", "-c",
             "read -P 0x44 64k 4k", str(tmp_path / "old.qcow2")])
    assert "Pattern verification failed" not in r.stdout, r.stdout
