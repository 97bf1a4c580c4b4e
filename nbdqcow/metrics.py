"""Prometheus metrics for the server, through the ``prometheus_client`` library.

The exposition format is not written by hand: ``prometheus_client`` (the
Prometheus project's own Python client) owns it.  Each server gets a private
:class:`~prometheus_client.CollectorRegistry`, so two servers in one process
(tests, an embedding program) never share or clash over metric names, and
nothing leaks into the library's global registry.

The server calls, per request, :meth:`Metrics.observe_request`; per
connection, :meth:`Metrics.connection_opened` / :meth:`Metrics.connection_closed`.
They are cheap, synchronous and never raise for a well-typed call.

Metric names (``nbdqcow_`` prefix; labels in braces):

* ``requests_total{export,command}``: requests completed, successful or not;
* ``request_bytes_total{export,command}``: payload bytes moved (READ: sent,
  WRITE: received) or affected (TRIM, WRITE_ZEROES, CACHE: their length);
* ``request_duration_seconds{export,command}``: latency histogram, from the
  request header read to the reply written;
* ``request_errors_total{export,command,error}``: requests answered with an
  NBD error, by errno name (``EIO``, ``ENOSPC``, ...);
* ``connections_total``, ``connections_active``: TCP and Unix clients;
* ``handshake_failures_total{reason}``: clients dropped before transmission.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "Metrics"]

#: The Content-Type of :meth:`Metrics.render`: the text format version the library writes.
CONTENT_TYPE = CONTENT_TYPE_LATEST

#: Latency buckets in seconds: from a cached 4 KiB read (tens of microseconds)
#: to a large, synced write over a slow disk (seconds).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


class Metrics:
    """The server's metrics, in a registry of their own."""

    def __init__(self, namespace: str = "nbdqcow") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # The label values seen per export, so that forget_export() can remove
        # exactly those series through the public API.
        self._commands: dict[str, set[str]] = {}
        self._errors: dict[str, set[tuple[str, str]]] = {}
        reg = self.registry
        labels = ("export", "command")
        self.requests = Counter(
            "requests", "NBD requests completed", labels, namespace=namespace, registry=reg
        )
        self.request_bytes = Counter(
            "request_bytes",
            "Bytes read, written or affected by NBD requests",
            labels,
            namespace=namespace,
            registry=reg,
        )
        self.latency = Histogram(
            "request_duration_seconds",
            "Time from request received to reply sent",
            labels,
            namespace=namespace,
            registry=reg,
            buckets=LATENCY_BUCKETS,
        )
        self.errors = Counter(
            "request_errors",
            "NBD requests answered with an error",
            (*labels, "error"),
            namespace=namespace,
            registry=reg,
        )
        self.connections = Counter(
            "connections", "Client connections accepted", namespace=namespace, registry=reg
        )
        self.active = Gauge(
            "connections_active", "Client connections open", namespace=namespace, registry=reg
        )
        self.handshake_failures = Counter(
            "handshake_failures",
            "Connections that ended before transmission, by reason",
            ("reason",),
            namespace=namespace,
            registry=reg,
        )

    def observe_request(
        self, export: str, command: str, nbytes: int, seconds: float, error: str | None = None
    ) -> None:
        """Record one completed request.

        Args:
            export: the export name.
            command: the NBD command without prefix (``"READ"``, ``"WRITE"``...).
            nbytes: payload bytes moved or affected (0 for FLUSH).
            seconds: latency.
            error: the errno name of an error reply (``"EIO"``), else None.
        """
        self._commands.setdefault(export, set()).add(command)
        self.requests.labels(export, command).inc()
        if nbytes > 0:
            self.request_bytes.labels(export, command).inc(nbytes)
        self.latency.labels(export, command).observe(seconds)
        if error is not None:
            self._errors.setdefault(export, set()).add((command, error))
            self.errors.labels(export, command, error).inc()

    def connection_opened(self) -> None:
        self.connections.inc()
        self.active.inc()

    def connection_closed(self) -> None:
        self.active.dec()

    def handshake_failed(self, reason: str) -> None:
        """A client left or was dropped during the handshake (``"timeout"``, ``"tls"``...)."""
        self.handshake_failures.labels(reason).inc()

    def forget_export(self, export: str) -> None:
        """Drop the series of a removed export (after a reload), so they stop being scraped."""
        for command in self._commands.pop(export, set()):
            for metric in (self.requests, self.request_bytes, self.latency):
                with contextlib.suppress(KeyError):  # a series never observed
                    metric.remove(export, command)
        for command, error in self._errors.pop(export, set()):
            self.errors.remove(export, command, error)

    def render(self) -> bytes:
        """The exposition text of every metric (content type :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)
