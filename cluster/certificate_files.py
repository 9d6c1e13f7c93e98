"""A TLS certificate and key on disk, re-read when either file changes (cert-manager renewing a Secret, an
operator replacing the files), for the proxies that serve them: the gRPC proxy (cluster.grpc_tls) and Serve's
HTTPS proxy (cluster.https_renewal). A changed pair that does not load as a pair (a key written before its
certificate, say) keeps the current one until it does, with one warning per change.

Runs in Serve's proxy process: keep the imports light.
"""
from __future__ import annotations

import logging
import os
import ssl
from typing import Callable, Generic, Optional, TypeVar

T = TypeVar("T")
log = logging.getLogger("herd.tls")


def check_pair(cert_file: str, key_file: str) -> None:
    """Raise ssl.SSLError unless the files are a PEM certificate (chain) and its unencrypted private key. No
    password is given: OpenSSL would otherwise ask for one on the terminal (grpc cannot use encrypted keys)."""
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file, password=b"")


class CertificateFiles(Generic[T]):
    """The two files and what `load(cert_file, key_file)` makes of them; `renewed()` is a stat of the two when
    nothing changed."""

    def __init__(self, cert_file: str, key_file: str, load: Callable[[str, str], T]):
        self.cert_file, self.key_file, self._load = cert_file, key_file, load
        self._stamp = self._stat()
        self._failed_stamp: Optional[tuple] = None

    def load(self) -> T:
        return self._load(self.cert_file, self.key_file)

    def renewed(self) -> Optional[T]:
        """load()'s result when the files changed and load as a pair, else None."""
        try:
            stamp = self._stat()
        except OSError:   # a file being replaced: the next look sees it
            return None
        if stamp in (self._stamp, self._failed_stamp):
            return None
        try:
            check_pair(self.cert_file, self.key_file)    # before anything live is touched
            loaded = self.load()
        except (OSError, ssl.SSLError) as e:
            self._failed_stamp = stamp    # said once per change, not at every look
            log.warning("TLS: keeping the current certificate: %s and %s do not load as a pair (%s)",
                        self.cert_file, self.key_file, e)
            return None
        self._stamp = stamp
        log.info("TLS: serving the renewed certificate %s", self.cert_file)
        return loaded

    def _stat(self) -> tuple:
        return tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in map(os.stat, (self.cert_file, self.key_file)))
