"""gunicorn's gevent worker, with a shutdown that does not wait on idle keep-alive
connections, and answers written in one ``send``.

On SIGTERM the stock worker stops accepting and waits (up to ``graceful_timeout``) until
every connection handler has ended, including handlers that only wait for a next request
on an idle keep-alive connection (OpenAI clients keep their connections open): a restart
then takes the full graceful timeout for nothing. Here the idle connections are shut down
at once; requests and streams in progress still get the graceful timeout to finish.

gunicorn writes a response's head and its body with two ``sendall`` calls; on the
request path of a proxy that is one system call (and one packet) in five for nothing.
:class:`OneWriteResponse` keeps the head until the first body bytes (or the end) and
sends both together; for a stream, the head goes out with the first SSE event.
"""

from __future__ import annotations

import socket

import gevent
from gunicorn import util
from gunicorn.http import wsgi
from gunicorn.workers.ggevent import GeventWorker


class OneWriteResponse(wsgi.Response):
    _head: bytes | None = None

    def send_headers(self):
        if self.headers_sent:
            return
        lines = self.default_headers()
        lines.extend(f"{k}: {v}\r\n" for k, v in self.headers)
        self._head = util.to_bytestring("{}\r\n".format("".join(lines)), "latin-1")
        self.headers_sent = True

    def _flush_head(self) -> None:
        head, self._head = self._head, None
        if head is not None:
            self.sock.sendall(head)

    def _emit_body(self, data):
        head, self._head = self._head, None
        if head is None:
            return super()._emit_body(data)
        if self.chunked:
            data = b"%X\r\n%b\r\n" % (len(data), data)
        self.sock.sendall(head + data)

    def sendfile(self, respiter):
        return False  # the router serves no files; write() keeps the head-with-body rule

    def close(self):
        if not self.headers_sent:
            self.send_headers()
        self._flush_head()
        super().close()


class RouterWorker(GeventWorker):
    def init_process(self):
        wsgi.Response = OneWriteResponse  # this worker process only: wsgi.create() builds this class
        self._connections: set = set()
        self._busy: set = set()
        super().init_process()

    def handle(self, listener, client, addr):
        # SSE events are small writes in a row: without TCP_NODELAY, Nagle's algorithm would
        # hold each one until the client's delayed ACK of the previous (up to ~40 ms)
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass  # not TCP (a unix socket)
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
