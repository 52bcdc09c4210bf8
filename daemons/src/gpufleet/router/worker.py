"""gunicorn's gevent worker, with a shutdown that does not wait on idle keep-alive
connections.

On SIGTERM the stock worker stops accepting and waits (up to ``graceful_timeout``) until
every connection handler has ended, including handlers that only wait for a next request
on an idle keep-alive connection (OpenAI clients keep their connections open): a restart
then takes the full graceful timeout for nothing. Here the idle connections are shut down
at once; requests and streams in progress still get the graceful timeout to finish.
"""

from __future__ import annotations

import socket

import gevent
from gunicorn.workers.ggevent import GeventWorker


class RouterWorker(GeventWorker):
    def init_process(self):
        self._connections: set = set()
        self._busy: set = set()
        super().init_process()

    def handle(self, listener, client, addr):
        self._connections.add(client)
        try:
            super().handle(listener, client, addr)
        finally:
            self._connections.discard(client)

    def handle_request(self, listener_name, req, sock, addr):
        self._busy.add(sock)
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            self._busy.discard(sock)
            if not self.alive:
                _shutdown(sock)  # the answer is out; do not wait for another request

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)
        gevent.spawn(self._close_idle)

    def _close_idle(self):
        for sock in list(self._connections - self._busy):
            _shutdown(sock)


def _shutdown(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
