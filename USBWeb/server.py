"""Start the page: ``serve()`` is what ``usb web`` runs.

Safe by default: it listens on 127.0.0.1 (another ``host`` prints that anyone on that network can use it: there is
no login), keeps every uploaded and generated file in one private temporary folder that is deleted on exit, caps
what a browser may send, and never tells the browser a server path.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import sys
import tempfile
from typing import Optional

from trame.app import get_server

from USBLib.errors import InputError

from .app import USBWebApp
from .uploads import DEFAULT_LIMIT_MB, PrivateFolder

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach."""
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_warning(host: str, port: int) -> Optional[str]:
    """The warning printed when the page listens beyond this machine, else None."""
    if is_loopback(host):
        return None
    return (f"usb web: listening on {host}:{port}: anyone who can reach this machine on that network can use the "
            "page, upload scans and run edits; there is no login.")


def listen_error(host: str, port: int, exc: OSError) -> InputError:
    """One line for an address the page cannot listen on (``usb`` prints it and exits with its input-error code)."""
    if exc.errno == errno.EADDRINUSE:
        return InputError(f"port {port} on {host} is in use: choose another with --port")
    return InputError(f"cannot listen on {host} port {port}: {exc.strerror or exc}")


def check_port(host: str, port: int) -> None:
    """Raise ``listen_error`` when ``host``:``port`` cannot be listened on (a port in use, an address this machine
    does not have), before anything starts; every address ``host`` resolves to is tried, as the server binds them."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InputError(f"cannot listen on {host}: {exc.strerror}") from None
    for family, kind, proto, _name, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no conflict
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise listen_error(host, port, exc) from None


def cap_client_messages(limit_bytes: int) -> None:
    """Refuse websocket messages larger than ``limit_bytes`` (+ 1 MiB for the message itself).

    Works around wslink allowing any authenticated client 4 GiB per message (``wslink.protocol`` sets the
    un-chunker's limit to a constant after the handshake): the cap is applied where that limit is set."""
    from wslink import chunking

    cap = int(limit_bytes) + 2**20
    original = chunking.UnChunker.set_max_message_size
    if getattr(original, "_usb_cap", None) == cap:
        return

    def capped(self, size: int) -> None:
        original(self, min(int(size), cap))

    capped._usb_cap = cap  # type: ignore[attr-defined]
    chunking.UnChunker.set_max_message_size = capped


def serve(host: str = "127.0.0.1", port: int = 8080, model: Optional[str] = None, device: str = "auto",
          max_upload_mb: float = DEFAULT_LIMIT_MB) -> int:
    """Serve the page until Ctrl-C; returns the exit code. Raises ``InputError`` (one line) when the address cannot
    be listened on, e.g. a port in use."""
    check_port(host, port)
    warning = host_warning(host, port)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    private = PrivateFolder(max_upload_mb)
    print(f"usb web: files go to the private folder {private.path} (deleted on exit)", flush=True)
    tempfile.tempdir = str(private.path)  # the worker's job folders too: all of it goes when the server stops
    try:
        cap_client_messages(private.limit_bytes)
        logging.getLogger("trame_server").setLevel(logging.WARNING)
        server = get_server("usb-web", client_type="vue3")
        app = USBWebApp(server, private=private, model=model, device=device)
        url_host = f"[{host}]" if ":" in host else host
        server.controller.on_server_ready.add(
            lambda **_: print(f"usb web: open http://{url_host}:{server.port}/ (Ctrl-C stops it)", flush=True))
        argv, sys.argv = sys.argv, sys.argv[:1]  # trame would read usb's own options as its own
        try:
            server.start(host=host, port=port, open_browser=False, show_connection_info=False, timeout=0)
        except OSError as exc:  # taken since check_port looked
            if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
                raise listen_error(host, port, exc) from None
            raise
        finally:
            sys.argv = argv
            app.jobs.cancel()
    finally:
        tempfile.tempdir = None
        private.remove()
    return 0
