"""Delivery to the node's merger over its Unix socket, from the flush thread.

Runs in every replica, on its flush thread. It decides which way a delivery goes: over
the node merger's Unix socket (:mod:`ray_monitor.node.local_socket`) when there is one
to connect to, else by Ray actor call (:class:`~ray_monitor.replica.delivery.ActorSink`,
unchanged: the merger is not up yet, the replica runs outside Ray Serve, the socket
broke, or ``RAY_MONITOR_NODE_SOCKET=0``). What a delivery means does not change: the
same snapshots and kept-traces cursor, the same answer once the aggregator took them,
the same re-send of whatever was in flight when the receiver went away (the aggregator
drops copies by replica and sequence). An idle replica's delivery a second costs about
a millisecond of its CPU by Ray call and a tenth of that over the socket.

Nothing here blocks the flush thread: the socket is non-blocking, a frame that does not
fit the socket's buffer is finished at the next flush, and the answers that arrived are
read at the next flush (as :class:`ActorSink` checks its refs with ``timeout=0``), with
at most :data:`~ray_monitor.replica.delivery.MAX_IN_FLIGHT` deliveries unanswered.
When the replica stops (``Runtime.close``, after the recorder's last flush),
:meth:`LocalSink.close` finishes the last frame, waits up to a second for its answers and
closes the socket.

The merger is trusted as the replica's own user: the socket's directory must be this
uid's with mode 700 and the peer's ``SO_PEERCRED`` uid this uid, or the replica keeps
to Ray calls (counted in ``ray_monitor_self_errors_total``, logged once).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from typing import Any, Callable, Optional

from ray_monitor.common import env
from ray_monitor.common import node_socket as wire
from ray_monitor.replica.delivery import MAX_IN_FLIGHT, ActorSink

__all__ = ["LocalSink", "with_local_socket"]

logger = logging.getLogger(__name__)

#: How often a replica without a connection looks for its merger's socket (a ``stat``).
CONNECT_EVERY_S = 2.0


class LocalSink:
    """Delivers over ``path`` while connected, through ``fallback`` otherwise."""

    def __init__(self, fallback: ActorSink, path: str, *,
                 on_failure: Optional[Callable[..., Any]] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fallback = fallback
        self.path = path
        self.clock = clock
        self.on_failure = on_failure
        self._sock: Optional[socket.socket] = None
        self._next_connect = 0.0
        self._out = bytearray()  # frames not yet written
        self._in = bytearray()  # answers not yet whole
        self._in_flight: dict[int, list] = {}  # delivery id -> its snapshots, in send order
        self._next_id = 1
        self._carry: list = []  # what a raising fallback send kept (see send)
        self._logged: set[str] = set()
        self.socket_deliveries = 0

    # The kept-traces hand-off and cursor are the Ray path's, shared by both ways.
    @property
    def on_kept(self) -> Optional[Callable[[list[str]], Any]]:
        return self.fallback.on_kept

    @on_kept.setter
    def on_kept(self, fn: Optional[Callable[[list[str]], Any]]) -> None:
        self.fallback.on_kept = fn

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def send(self, snapshots: list) -> list:
        """ActorSink's contract: returns what to keep buffered; what it took is delivered
        (or kept here, to be sent again) until its answer came."""
        mine, self._carry = self._carry + self._poll(), []
        try:  # answers to (and re-sends of) deliveries made by Ray call before
            mine = self.fallback.send([]) + mine
        except Exception as e:
            self._failed("actor_call", e)
        pending = mine + snapshots
        if not pending:
            return []
        if self._connect():
            if len(self._in_flight) >= MAX_IN_FLIGHT:
                return pending  # the merger is slow: wait, as ActorSink does
            try:
                frame = wire.encode((self._next_id, pending, self.fallback.kept_cursor))
            except Exception as e:  # too big (or unpicklable): Ray's path takes it
                self._failed("frame", e)
            else:
                self._in_flight[self._next_id] = pending
                self._next_id += 1
                self._out += frame
                self._write()
                if self._sock is not None:
                    self.socket_deliveries += 1
                    return []
                pending = self._take_back()  # broke while writing: all of it by Ray call
                mine = pending[:len(pending) - len(snapshots)]  # ends with ``snapshots``
        try:
            return self.fallback.send(pending)
        except Exception:
            self._carry = mine  # the caller keeps ``snapshots``; these are ours to keep
            raise

    def close(self, timeout: float = 1.0) -> None:
        """Ends the connection when the replica's recorder stops: writes what is left of
        the last frames, reads the answers that come within ``timeout`` (their kept ids),
        then closes the socket. A frame written whole is delivered whatever comes after
        (the merger takes it before it sees the end). Never raises; failures counted."""
        sock = self._sock
        if sock is None:
            return
        deadline = time.monotonic() + max(0.0, timeout)
        try:
            while self._sock is not None and (self._out or self._in_flight):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                want = [sock] if self._in_flight else []
                select.select(want, [sock] if self._out else [], [], min(left, 0.05))
                self._poll()
        except Exception as e:  # stopping: nothing to do but count it
            self._failed("close", e)
        finally:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            self._in_flight.clear()
            self._out.clear()
            self._in.clear()

    def _connect(self) -> bool:
        if self._sock is not None:
            return True
        now = self.clock()
        if now < self._next_connect:
            return False
        self._next_connect = now + CONNECT_EVERY_S
        if not os.path.exists(self.path):
            return False  # no merger on this node (yet): Ray calls, nothing to count
        why = wire.check_dir(os.path.dirname(self.path))
        if why is not None:
            self._failed("untrusted_dir", PermissionError(why))
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.connect(self.path)  # a Unix socket connects at once or not at all
            uid = wire.peer_uid(sock)
            if uid != os.getuid():
                raise PermissionError(f"the socket's peer is uid {uid}, not {os.getuid()}")
        except (ConnectionRefusedError, FileNotFoundError, BlockingIOError):
            sock.close()  # the merger is restarting (or its backlog is full): later
            return False
        except Exception as e:
            sock.close()
            self._failed("connect", e)
            return False
        self._sock = sock
        return True

    def _write(self) -> None:
        try:
            while self._out:
                n = self._sock.send(self._out)
                del self._out[:n]
        except BlockingIOError:
            return  # the rest at the next flush
        except OSError as e:
            self._broken(e)

    def _poll(self) -> list:
        """Reads the answers that arrived; on a broken connection, the deliveries that
        were in flight (to be sent again, in their order)."""
        if self._sock is None:
            return []
        if self._out:
            self._write()
        try:
            while self._sock is not None:
                data = self._sock.recv(65536)
                if not data:
                    raise ConnectionResetError("the merger closed the connection")
                self._in += data
        except BlockingIOError:
            pass
        except OSError as e:
            self._broken(e)
        again: list = []
        try:
            for body in wire.split_frames(self._in):
                did, reply = wire.decode(body, 2)
                batch = self._in_flight.pop(did, None)
                if batch is None:
                    continue
                if isinstance(reply, dict) and wire.FAILED in reply:
                    again.extend(batch)  # failed in the merger: deliver again, in order
                    self._failed("merger_failed", RuntimeError(reply[wire.FAILED]))
                else:
                    self.fallback._take_reply(reply)
        except wire.FrameError as e:
            self._broken(e)
        return again + (self._take_back() if self._sock is None else [])

    def _broken(self, exc: BaseException) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._failed("broken", exc)

    def _take_back(self) -> list:
        back = [s for did in sorted(self._in_flight) for s in self._in_flight[did]]
        self._in_flight.clear()
        self._out.clear()
        self._in.clear()
        return back

    def _failed(self, cause: str, exc: BaseException) -> None:
        if self.on_failure is not None:
            try:
                self.on_failure(f"node_socket_{cause}:{type(exc).__name__}", exc)
            except Exception:
                pass
        if cause not in self._logged:
            self._logged.add(cause)
            logger.warning("ray-monitor: node socket %s: %s (%r); delivering by Ray call "
                           "meanwhile; logged once", self.path, cause, exc)


def with_local_socket(sink: Optional[ActorSink], node_id: Optional[str], *,
                      on_failure: Optional[Callable[..., Any]] = None) -> Any:
    """``sink`` wrapped to deliver over the node's socket when there is one (the same
    sink when the replica is not on a Ray node, or ``RAY_MONITOR_NODE_SOCKET=0``)."""
    if sink is None or not node_id or not env.NODE_SOCKET.get():
        return sink
    path = wire.socket_path(wire.session_dir(), node_id)
    return sink if path is None else LocalSink(sink, path, on_failure=on_failure)
