"""The gateway's Prometheus counters, served as text exposition (format 0.0.4) on a loopback port.

``GET http://127.0.0.1:PORT/metrics``; every counter is listed from start-up (at 0 until it
counts). Labels carry coarse categories only, never identifiers.
"""

from __future__ import annotations

import errno
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COUNTERS = {
    "wff_pacs_instances_received_total": ("Instances received and kept (new or changed), by source", ("source",)),
    "wff_pacs_instances_ignored_total": ("Instances not taken as input, by reason", ("reason",)),
    "wff_pacs_associations_rejected_total": ("Associations refused, by reason", ("reason",)),
    "wff_pacs_studies_diagnosed_total": ("Result versions made (a study diagnosed)", ()),
    "wff_pacs_results_stored_total": ("Result versions sent to the PACS", ()),
    "wff_pacs_retries_total": ("Failed attempts to be tried again, by stage", ("stage",)),
    "wff_pacs_dead_letters_total": ("Studies given up, by stage", ("stage",)),
}
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LOOPBACK = "127.0.0.1"


class Metrics:
    """Counters keyed by name and label values; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple[str, ...]], float] = {(name, ()): 0.0 for name, (_, labels) in COUNTERS.items() if not labels}

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        _, names = COUNTERS[name]
        if set(labels) != set(names):
            raise ValueError(f"{name} takes the labels {names}, got {tuple(labels)}")
        key = (name, tuple(str(labels[n]) for n in names))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, name: str, **labels: str) -> float:
        _, names = COUNTERS[name]
        with self._lock:
            return self._values.get((name, tuple(str(labels[n]) for n in names)), 0.0)

    def exposition(self) -> str:
        """Every counter as Prometheus text."""
        with self._lock:
            values = dict(self._values)
        lines = []
        for name, (help_text, label_names) in COUNTERS.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
            for (key_name, label_values), value in sorted(values.items()):
                if key_name != name:
                    continue
                labels = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(label_names, label_values))
                lines.append(f"{name}{{{labels}}} {value:g}" if labels else f"{name} {value:g}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class MetricsServer:
    """``metrics.exposition()`` at http://127.0.0.1:PORT/metrics, in a daemon thread; ``close()`` stops it."""

    def __init__(self, metrics: Metrics, port: int) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "the metrics are at /metrics")
                    return
                body = metrics.exposition().encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args) -> None:  # noqa: A002 - scrapes are not logged
                return

        try:
            self._server = ThreadingHTTPServer((LOOPBACK, port), Handler)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise OSError(e.errno, f"metrics port {port} on {LOOPBACK} is in use by another program; choose another "
                                       "--metrics-port, or stop the program that holds it") from e
            raise
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="wff-pacs-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
