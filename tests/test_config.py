"""nbdqcow.config and nbdqcow.tomlcheck: the exports file, its errors, ACLs, reload diffs."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdqcow.config import (
    DEFAULT_PORT,
    ConfigError,
    ExportConfig,
    LogFormat,
    ServerConfig,
    TcpAddress,
    TlsMode,
    UnixAddress,
    client_allowed,
    diff_configs,
    load_config,
    parse_address,
)
from nbdqcow.errors import NbdqcowError
from nbdqcow.tomlcheck import KeyLocator, format_key


def write(tmp_path: Path, text: str, name: str = "exports.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    """A directory with the files a config refers to."""
    for name in ("golden.qcow2", "pc1.qcow2", "cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "subdir").mkdir()
    return tmp_path


FULL = """\
    # A lab: everything set
    [server]
    listen = ["0.0.0.0:10809", "[::]:10810", "unix:nbd.sock"]
    admin = "unix:/run/nbdqcow/admin.sock"
    log_format = "json"

    [server.limits]
    max_connections = 10
    max_in_flight = 8
    handshake_timeout = 2
    poll_max_us = 0

    [server.tls]
    mode = "optional"
    cert = "cert.pem"
    key = "key.pem"
    ca = "ca.pem"
    verify_client = true

    [exports.golden]
    image = "golden.qcow2"
    format = "qcow2"
    description = "installed base"
    snapshot = "installed"
    allow = ["10.0.0.0/24", "fd00::/64", "192.168.1.7"]

    [exports."pc 1"]
    image = "pc1.qcow2"
    read_only = false
    allow_unix = false
    require_tls = true
    max_connections = 1
"""


class TestLoad:
    def test_full_file(self, lab: Path) -> None:
        cfg = load_config(write(lab, FULL))
        assert cfg.listen == (
            TcpAddress("0.0.0.0", 10809),
            TcpAddress("::", 10810),
            UnixAddress(str(lab / "nbd.sock")),
        )
        assert cfg.admin == UnixAddress("/run/nbdqcow/admin.sock")
        assert cfg.log_format is LogFormat.JSON
        assert (cfg.limits.max_connections, cfg.limits.max_in_flight) == (10, 8)
        assert cfg.limits.handshake_timeout == 2.0
        assert cfg.limits.poll_max_us == 0
        assert cfg.tls.mode is TlsMode.OPTIONAL
        assert cfg.tls.cert == str(lab / "cert.pem") and cfg.tls.verify_client
        golden, pc1 = cfg.exports
        assert golden.name == "golden" and golden.image == str(lab / "golden.qcow2")
        assert golden.format == "qcow2" and golden.snapshot == "installed"
        assert golden.read_only, "a snapshot export is read-only by default"
        assert golden.allow == (
            ipaddress.ip_network("10.0.0.0/24"),
            ipaddress.ip_network("fd00::/64"),
            ipaddress.ip_network("192.168.1.7/32"),
        )
        assert pc1.name == "pc 1" and not pc1.read_only and pc1.format is None
        assert not pc1.allow_unix and pc1.require_tls and pc1.max_connections == 1
        assert cfg.export_map()["pc 1"] is pc1
        assert cfg.source == str(lab / "exports.toml")

    def test_defaults(self, lab: Path) -> None:
        cfg = load_config(write(lab, '[exports.a]\nimage = "pc1.qcow2"\n'))
        assert cfg.listen == (TcpAddress("127.0.0.1", DEFAULT_PORT),)
        assert cfg.admin is None, "the admin endpoint is off by default"
        assert cfg.tls.mode is TlsMode.OFF and cfg.log_format is LogFormat.TEXT
        (a,) = cfg.exports
        assert a == ExportConfig(name="a", image=str(lab / "pc1.qcow2"))
        assert a.allow is None and a.allow_unix

    def test_single_listen_string_and_default_export_name(self, lab: Path) -> None:
        cfg = load_config(
            write(lab, '[server]\nlisten = "/tmp/x.sock"\n[exports.""]\nimage = "pc1.qcow2"\n')
        )
        assert cfg.listen == (UnixAddress("/tmp/x.sock"),)
        assert cfg.exports[0].name == ""

    def test_check_files_off(self, tmp_path: Path) -> None:
        path = write(tmp_path, '[exports.a]\nimage = "/nonexistent/a.qcow2"\n')
        with pytest.raises(ConfigError, match="No such file"):
            load_config(path)
        assert load_config(path, check_files=False).exports[0].image == "/nonexistent/a.qcow2"

    def test_unreadable_file_is_oserror(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError):
            load_config(tmp_path / "missing.toml")

    def test_not_utf8(self, tmp_path: Path) -> None:
        path = tmp_path / "bad.toml"
        path.write_bytes(b'[exports.a]\nimage = "\xff"\n')
        with pytest.raises(ConfigError, match=r"bad\.toml:2: not UTF-8 \(byte 21\)$"):
            load_config(path)


# (file text, expected message after "exports.toml:").  Lines are 1-based.
ERRORS = [
    ("[exports.a]\nimage = 'pc1.qcow2'\nread_only = \"yes\"\n",
     '3: exports.a.read_only: expected a boolean, got "yes"'),
    ("[exports.a]\nimage = 'pc1.qcow2'\nread_ony = true\n",
     '3: exports.a.read_ony: unknown key (did you mean "read_only"?)'),
    ("[exports.a]\nimage = 'pc1.qcow2'\n\n[server]\nlisten = [\n  '127.0.0.1',\n  'x:y',\n]\n",
     "7: server.listen[1]: port 'y' is not a number from 0 to 65535"),
    ("[server]\nlisten = []\n[exports.a]\nimage = 'pc1.qcow2'\n",
     "2: server.listen: empty: the server would accept no client"),
    ("[server]\nlisten = ['a:1', 'a:1']\n[exports.a]\nimage = 'pc1.qcow2'\n",
     "2: server.listen[1]: a:1 is listed twice"),
    ("[server]\nadmin = '127.0.0.1'\n[exports.a]\nimage = 'pc1.qcow2'\n",
     "2: server.admin: '127.0.0.1' has no port (HOST:PORT)"),
    ("[server]\nlog_format = 'xml'\n[exports.a]\nimage = 'pc1.qcow2'\n",
     '2: server.log_format: expected "text" or "json", got "xml"'),
    ("[server]\nport = 10809\n[exports.a]\nimage = 'pc1.qcow2'\n",
     "2: server.port: unknown key (known: admin, limits, listen, log_format, tls)"),
    ("[server.limits]\nmax_connections = 0\n[exports.a]\nimage = 'pc1.qcow2'\n",
     "2: server.limits.max_connections: 0 is not from 1 to 1048576"),
    ("[server.limits]\nmax_in_flight = true\n[exports.a]\nimage = 'pc1.qcow2'\n",
     "2: server.limits.max_in_flight: expected an integer, got true"),
    ("[server.limits]\npoll_max_us = -1\n[exports.a]\nimage = 'pc1.qcow2'\n",
     "2: server.limits.poll_max_us: -1 is not from 0 to 1000"),
    ("[server.limits]\nhandshake_timeout = -1.5\n[exports.a]\nimage = 'pc1.qcow2'\n",
     "2: server.limits.handshake_timeout: -1.5 is not from 0 (excluded) to 86400"),
    ("[server.tls]\nmode = 'required'\ncert = 'cert.pem'\n[exports.a]\nimage = 'pc1.qcow2'\n",
     '2: server.tls.mode: "required" needs server.tls.key'),
    ("[server.tls]\ncert = 'cert.pem'\n[exports.a]\nimage = 'pc1.qcow2'\n",
     '2: server.tls.cert: has no effect while mode is "off"'),
    ("[server.tls]\nmode = 'optional'\ncert = 'cert.pem'\nkey = 'key.pem'\n"
     "verify_client = true\n[exports.a]\nimage = 'pc1.qcow2'\n",
     "5: server.tls.verify_client: needs server.tls.ca"),
    ("[server.tls]\nmode = 'optional'\ncert = 'nope.pem'\n",
     "3: server.tls.cert: {lab}/nope.pem: No such file or directory"),
    ("[server]\n", "exports: no exports defined (add an [exports.NAME] table)"),
    ("[exports]\na = 1\n", "2: exports.a: expected a table, got 1"),
    ("[exports.a]\nread_only = true\n", "1: exports.a: missing key: image"),
    ("[exports.a]\nimage = 'missing.qcow2'\n",
     "2: exports.a.image: {lab}/missing.qcow2: No such file or directory"),
    ("[exports.a]\nimage = 'subdir'\n",
     "2: exports.a.image: {lab}/subdir: not a regular file or block device"),
    ("[exports.a]\nimage = 'pc1.qcow2'\nformat = 'vmdk'\n",
     '3: exports.a.format: expected "raw" or "qcow2", got "vmdk"'),
    ("[exports.a]\nimage = 'pc1.qcow2'\nformat = 'raw'\nsnapshot = 's1'\n",
     '4: exports.a.snapshot: raw images have no snapshots (format = "raw")'),
    ("[exports.a]\nimage = 'pc1.qcow2'\nsnapshot = 's1'\nread_only = false\n",
     "4: exports.a.read_only: a snapshot is served read-only"),
    ("[exports.a]\nimage = 'pc1.qcow2'\nallow = ['10.0.0.0/24',\n  '10.1.2.3/8']\n",
     '4: exports.a.allow[1]: "10.1.2.3/8" has host bits set (did you mean "10.0.0.0/8"?)'),
    ("[exports.a]\nimage = 'pc1.qcow2'\nallow = ['lab']\n",
     "3: exports.a.allow[0]: \"lab\" is not an IP network ('lab' does not appear to be an "
     "IPv4 or IPv6 network)"),
    ("[exports.a]\nimage = 'pc1.qcow2'\nallow = [10]\n",
     "3: exports.a.allow[0]: expected a string, got 10"),
    ("[exports.a]\nimage = 'pc1.qcow2'\nrequire_tls = true\n",
     '3: exports.a.require_tls: server.tls.mode is "off": no client could use this export'),
    ("[exports.'a\"b']\nimage = 'pc1.qcow2'\ndescription = '" + "x" * 4097 + "'\n",
     '3: exports."a\\"b".description: longer than 4096 bytes'),
    ("exports.a.image = 'pc1.qcow2'\nexports.a.colour = 'blue'\n",
     '2: exports.a.colour: unknown key (known: allow, allow_unix, description, format, '
     "image, max_connections, read_only, require_tls, snapshot)"),
    ("[exports.a]\nimage = 'pc1.qcow2'\n[extra]\n",
     '3: extra: unknown key (known: exports, server)'),
    ("[exports.a]\nimage = 'pc1.qcow2'\nread_only = yes\n",
     "3: invalid TOML: Invalid value"),
    ("[exports.a]\nimage = 'pc1.qcow2'\nallow = [\n",
     "3: invalid TOML: Invalid value"),
]


@pytest.mark.parametrize(("text", "expected"), ERRORS)
def test_errors_name_file_line_and_key(lab: Path, text: str, expected: str) -> None:
    path = write(lab, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    sep = ":" if expected[0].isdigit() else ": "
    assert str(info.value) == f"{path}{sep}{expected.format(lab=lab)}"
    assert isinstance(info.value, NbdqcowError)


def test_error_attributes(lab: Path) -> None:
    path = write(lab, "[exports.a]\nimage = 'pc1.qcow2'\nread_only = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert (err.path, err.line, err.key) == (str(path), 3, "exports.a.read_only")
    assert err.reason == "expected a boolean, got 1"


class TestParseAddress:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("127.0.0.1", TcpAddress("127.0.0.1", DEFAULT_PORT)),
            ("localhost:0", TcpAddress("localhost", 0)),
            ("[::1]:9", TcpAddress("::1", 9)),
            ("[fe80::1%eth0]", TcpAddress("fe80::1%eth0", DEFAULT_PORT)),
            ("unix:rel.sock", UnixAddress("rel.sock")),
            ("/run/x.sock", UnixAddress("/run/x.sock")),
        ],
    )
    def test_good(self, text: str, expected: object) -> None:
        assert parse_address(text) == expected

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("", "has no host"),
            (":10809", "has no host"),
            ("host:65536", "not a number from 0 to 65535"),
            ("host:-1", "not a number from 0 to 65535"),
            ("::1", "is not HOST:PORT"),
            ("[nope]:1", "is not an IPv6 address"),
            ("unix:", "empty Unix socket path"),
        ],
    )
    def test_bad(self, text: str, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            parse_address(text)

    def test_relative_unix_path_uses_base(self, tmp_path: Path) -> None:
        assert parse_address("unix:a.sock", base=tmp_path) == UnixAddress(str(tmp_path / "a.sock"))

    def test_str_round_trips(self) -> None:
        for addr in (TcpAddress("::1", 5), TcpAddress("h", 1), UnixAddress("/x")):
            assert parse_address(str(addr)) == addr


def export(allow: list[str] | None = None, allow_unix: bool = True) -> ExportConfig:
    nets = None if allow is None else tuple(ipaddress.ip_network(a) for a in allow)
    return ExportConfig(name="e", image="/x", allow=nets, allow_unix=allow_unix)


class TestClientAllowed:
    @pytest.mark.parametrize(
        ("allow", "peer", "expected"),
        [
            (None, ("203.0.113.9", 4000), True),
            ([], ("127.0.0.1", 4000), False),
            (["10.0.0.0/24"], ("10.0.0.255", 1), True),
            (["10.0.0.0/24"], ("10.0.1.0", 1), False),
            (["10.0.0.0/24"], ("::ffff:10.0.0.7", 1, 0, 0), True),  # dual-stack listener
            (["10.0.0.0/24"], ("::ffff:10.9.0.7", 1, 0, 0), False),
            (["fd00::/64"], ("fd00::1", 1, 0, 0), True),
            (["fd00::/64"], ("fd01::1", 1, 0, 0), False),
            (["fe80::/10"], ("fe80::1%eth0", 1, 0, 2), True),  # zone index is ignored
            (["::/0"], ("10.0.0.1", 1), False),  # IPv6 networks never match IPv4 peers
            (["0.0.0.0/0"], ("2001:db8::1", 1, 0, 0), False),
            (["::ffff:0:0/96"], ("::ffff:10.0.0.7", 1, 0, 0), True),  # matched as IPv6 too
            (None, ("not-an-ip", 1), False),
        ],
    )
    def test_tcp(self, allow: list[str] | None, peer: object, expected: bool) -> None:
        assert client_allowed(export(allow), peer) is expected

    @pytest.mark.parametrize("peer", ["", "/run/nbd.sock", b"\0abstract", None])
    def test_unix_clients_follow_allow_unix(self, peer: object) -> None:
        assert client_allowed(export([]), peer) is True
        assert client_allowed(export(None, allow_unix=False), peer) is False

    def test_unknown_peer_kind_is_refused(self) -> None:
        assert client_allowed(export(None), 42) is False

    @given(
        st.ip_addresses(v=4),
        st.ip_addresses(v=4),
        st.integers(min_value=0, max_value=32),
    )
    def test_matches_ipaddress_membership(
        self, peer: ipaddress.IPv4Address, base: ipaddress.IPv4Address, prefix: int
    ) -> None:
        net = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
        exp = ExportConfig(name="e", image="/x", allow=(net,))
        assert client_allowed(exp, (str(peer), 1)) is (peer in net)
        mapped = f"::ffff:{peer}"
        assert client_allowed(exp, (mapped, 1, 0, 0)) is (peer in net)


class TestDiff:
    def test_added_removed_changed(self) -> None:
        a, b, c = (ExportConfig(name=n, image=f"/{n}") for n in "abc")
        old = ServerConfig(exports=(a, b))
        new = ServerConfig(exports=(ExportConfig(name="b", image="/b", read_only=True), c))
        diff = diff_configs(old, new)
        assert (diff.added, diff.removed, diff.changed) == (("c",), ("a",), ("b",))
        assert diff.server_changed == () and diff
        assert diff.describe() == "added c; removed a; changed b"

    def test_same_config_is_empty(self, lab: Path) -> None:
        path = write(lab, FULL)
        diff = diff_configs(load_config(path), load_config(path))
        assert not diff and diff.describe() == "no change"

    def test_server_settings_need_restart(self) -> None:
        old = ServerConfig()
        new = ServerConfig(listen=(UnixAddress("/s"),), source="other.toml")
        diff = diff_configs(old, new)
        assert diff.server_changed == ("listen",)
        assert diff.describe() == "needs a restart: listen"


LOCATOR_DOC = '''\
# comment [not.a.table]
title = "x"  # a = 1
[server]
listen = [
  "a = 1",   # key-like text inside an array
  "[exports.fake]",
]
text = """
[exports.fake2]
b = 2
"""
lit = \'\'\'
c = 3 \'\'\'
inline = { d = 1, e = [1,
  2] }
[ exports . "q.k" ]
  "x y".z = 1
[[arr]]
v = 1
[[arr]]
v = 2
'''


class TestKeyLocator:
    @pytest.mark.parametrize(
        ("path", "line"),
        [
            (("title",), 2),
            (("server",), 3),
            (("server", "listen"), 4),
            (("server", "listen", 0), 5),  # elements of a multi-line array
            (("server", "listen", 1), 6),
            (("server", "listen", 2), 4),  # no such element: its key
            (("server", "text"), 8),
            (("server", "lit"), 12),
            (("server", "inline", "d"), 14),  # inline tables fall back too
            (("exports", "q.k"), 16),
            (("exports", "q.k", "x y"), 17),
            (("exports", "q.k", "x y", "z"), 17),
            (("arr", 0, "v"), 19),
            (("arr", 1), 20),
            (("arr", 1, "v"), 21),
        ],
    )
    def test_lines(self, path: tuple[str | int, ...], line: int) -> None:
        assert KeyLocator(LOCATOR_DOC).line_of(path) == line

    @pytest.mark.parametrize(
        "path", [("a",), ("exports", "fake"), ("exports", "fake2"), ("b",), ("c",), ("e",)]
    )
    def test_text_inside_values_is_not_a_key(self, path: tuple[str, ...]) -> None:
        assert KeyLocator(LOCATOR_DOC).line_of(path) is None

    def test_format_key(self) -> None:
        assert format_key(("exports", "my lab", "allow", 1)) == 'exports."my lab".allow[1]'
        assert format_key(("a-b_c", 'q"')) == 'a-b_c."q\\""'

    @settings(max_examples=60, deadline=None)
    @given(
        st.dictionaries(
            st.text(st.sampled_from("ab -.=[]\"'#"), min_size=1, max_size=6),
            st.dictionaries(
                st.text(st.sampled_from("xyz_.= "), min_size=1, max_size=5),
                st.sampled_from(["multi", "array", "plain", "inline"]),
                min_size=1,
                max_size=4,
            ),
            min_size=1,
            max_size=4,
        )
    )
    def test_generated_documents(self, doc: dict[str, dict[str, str]]) -> None:
        """Every key written into a document is found on the line it was written."""
        import tomllib

        lines: list[str] = []
        where: dict[tuple[str | int, ...], int] = {}
        decoy = "[t.'x'] \\\" k = 1"
        for table, keys in doc.items():
            lines.append(f"[ {quote(table)} ]  # [decoy]")
            where[(table,)] = len(lines)
            for key, kind in keys.items():
                lines.append(f"{quote(key)} = ")
                where[(table, key)] = len(lines)
                if kind == "multi":
                    lines[-1] += '"""'
                    lines += ["[decoy]", "x = 1 '''", '"""']
                elif kind == "array":
                    lines[-1] += "["
                    lines += [f'  "{decoy}", # ]', "  '[x]', [", "], {a = [1,", "2]}]"]
                    base = where[(table, key)]
                    where[(table, key, 0)] = base + 1
                    where[(table, key, 1)] = base + 2
                    where[(table, key, 2)] = base + 2
                    where[(table, key, 3)] = base + 3
                elif kind == "inline":
                    lines[-1] += "{ a = '}', b = {c = 1} }"
                else:
                    lines[-1] += f'"{decoy}"'
        text = "\n".join(lines) + "\n"
        parsed = tomllib.loads(text)
        assert parsed.keys() == doc.keys()
        locator = KeyLocator(text)
        for path, line in where.items():
            assert locator.line_of(path) == line, (path, text)


def quote(key: str) -> str:
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
