"""Plain TCP clients for the connection-level tests: what a server did with a socket it was sent little or
nothing on."""
from __future__ import annotations

import socket


def closed_by_server(s: socket.socket, within_s: float) -> bool:
    """Does the server close `s` (EOF or reset) within `within_s`? Whatever it sent first (a response, HTTP/2
    settings, a GOAWAY) is read and dropped."""
    s.settimeout(within_s)
    try:
        while True:
            if not s.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
