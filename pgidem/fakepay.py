"""A fake payment service on loopback, for the demo, the stability test, examples and tests.

It behaves like a payment provider that honours idempotency keys and fencing tokens, and keeps
its own record of what it did, outside the database under test, so that a checker can compare:

* ``POST /charges`` with a JSON body (``{"amount": 100, ...}``) and the headers
  ``Idempotency-Key`` (required) and ``Fencing-Token`` (optional). The first request with a key
  applies a charge and answers ``201`` with ``{"id": "ch_1", "key": ..., "amount": ...}``; a later
  request with the same key applies nothing and replays the same body with ``200`` and the
  header ``Idempotent-Replayed: true``. A request whose fencing token is lower than the highest
  token this service has seen for its key is refused with ``409`` ``{"error": "stale_token"}``.
* ``GET /charges``: every applied charge; ``GET /stats``: the counters of :class:`Stats`.

Run it in a process with :class:`FakePaymentService` (``start()``/``stop()``, or ``with``), or
from the shell with ``python -m pgidem.fakepay --port 8099``. :func:`charge` is a small client.
"""

from __future__ import annotations

import argparse
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Stats:
    """What the service saw: requests, charges applied, replays, stale tokens refused."""

    requests: int = 0
    applied: int = 0
    replayed: int = 0
    stale_refused: int = 0
    bad_requests: int = 0
    calls_per_key: dict[str, int] = field(default_factory=dict)


class PaymentError(Exception):
    """The service refused a charge (stale token, bad request) or could not be reached.

    Attributes:
        status: the HTTP status, or None when the service could not be reached.
        body: the decoded answer, when there was one.
    """

    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


AfterApply = Callable[[str, Mapping[str, str]], None]


class FakePaymentService:
    """The service, on a thread of this process.

    Args:
        host: the address to bind; loopback only by default.
        port: the port; 0 picks a free one (read it back from ``url``).
        record_path: if given, every applied charge is also appended there as a JSON line.
        after_apply: called with (key, request headers) right after a charge is applied and
            before the answer is sent: a fault injector can kill the caller in that window.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        record_path: Path | None = None,
        after_apply: AfterApply | None = None,
    ) -> None:
        self.stats = Stats()
        self.charges: dict[str, dict[str, Any]] = {}
        self.highest_token: dict[str, int] = {}
        self.record_path = record_path
        self.after_apply = after_apply
        self._lock = threading.Lock()
        self._server = _QuietServer((host, port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The service's base URL."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakePaymentService:
        """Serve on a background thread."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fakepay", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakePaymentService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def snapshot(self) -> dict[str, Any]:
        """The counters and charges, as plain data."""
        with self._lock:
            return {"stats": asdict(self.stats), "charges": list(self.charges.values())}

    # The request logic, under one lock: the check of the key, the fence and the apply are one
    # critical section, as they would be one transaction in a real provider.
    def handle_charge(
        self, key: str, token: int | None, body: dict[str, Any], headers: Mapping[str, str]
    ) -> tuple[int, dict[str, Any], bool]:
        """Apply or replay one charge; return (HTTP status, answer, replayed)."""
        with self._lock:
            self.stats.requests += 1
            self.stats.calls_per_key[key] = self.stats.calls_per_key.get(key, 0) + 1
            if token is not None:
                highest = self.highest_token.get(key)
                if highest is not None and token < highest:
                    self.stats.stale_refused += 1
                    return (
                        409,
                        {"error": "stale_token", "token": token, "highest_seen": highest},
                        False,
                    )
                self.highest_token[key] = token
            existing = self.charges.get(key)
            if existing is not None:
                self.stats.replayed += 1
                return 200, existing, True
            self.stats.applied += 1
            charge = {
                "id": f"ch_{self.stats.applied}",
                "key": key,
                "amount": body.get("amount"),
                "token": token,
            }
            self.charges[key] = charge
            if self.record_path is not None:
                with self.record_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(charge) + "\n")
        if self.after_apply is not None:
            self.after_apply(key, headers)
        return 201, charge, False

    def handle_bad_request(self) -> None:
        with self._lock:
            self.stats.requests += 1
            self.stats.bad_requests += 1


class _QuietServer(ThreadingHTTPServer):
    """A caller that died before reading its answer (an ``after_apply`` hook may kill it on
    purpose) is not an error of the service: no traceback on stderr for a broken connection."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


def _handler_for(service: FakePaymentService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _send(self, status: int, body: Any, replayed: bool = False) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if replayed:
                self.send_header("Idempotent-Replayed", "true")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            snap = service.snapshot()
            if self.path == "/charges":
                self._send(200, snap["charges"])
            elif self.path == "/stats":
                self._send(200, snap["stats"])
            else:
                self._send(404, {"error": "not_found"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b"{}"
            if self.path != "/charges":
                self._send(404, {"error": "not_found"})
                return
            key = self.headers.get("Idempotency-Key")
            token_text = self.headers.get("Fencing-Token")
            try:
                body = json.loads(raw or b"{}")
                token = int(token_text) if token_text else None
                if not key or not isinstance(body, dict):
                    raise ValueError("an Idempotency-Key header and a JSON object are required")
            except ValueError as exc:
                service.handle_bad_request()
                self._send(400, {"error": "bad_request", "detail": str(exc)})
                return
            status, answer, replayed = service.handle_charge(
                key, token, body, dict(self.headers.items())
            )
            self._send(status, answer, replayed)

    return Handler


def charge(
    url: str,
    *,
    key: str,
    amount: int,
    fencing_token: int | None = None,
    extra: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Ask the service for a charge; return its answer (first time or replayed).

    Raises:
        PaymentError: refused (``status`` 409 for a stale token, 400 for a bad request) or
            unreachable (``status`` None).
    """
    body = json.dumps({"amount": amount, **(extra or {})}).encode()
    request = urllib.request.Request(f"{url}/charges", data=body, method="POST")
    request.add_header("Content-Type", "application/json")
    request.add_header("Idempotency-Key", key)
    if fencing_token is not None:
        request.add_header("Fencing-Token", str(fencing_token))
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as exc:
        data = exc.read()
        try:
            decoded = json.loads(data)
        except ValueError:
            decoded = data.decode(errors="replace")
        raise PaymentError(
            f"the payment service refused: {exc.code} {decoded}", exc.code, decoded
        ) from exc
    except OSError as exc:
        raise PaymentError(f"the payment service is unreachable at {url}: {exc}") from exc


def stats(url: str, timeout: float = 10.0) -> dict[str, Any]:
    """Read the service's counters over HTTP."""
    with urllib.request.urlopen(f"{url}/stats", timeout=timeout) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def main() -> None:
    """``python -m pgidem.fakepay``: serve until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--record", type=Path, default=None, help="append charges to this file")
    ns = parser.parse_args()
    service = FakePaymentService(ns.host, ns.port, record_path=ns.record).start()
    print(f"fake payment service on {service.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        service.stop()


if __name__ == "__main__":
    main()
