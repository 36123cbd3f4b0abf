"""The node merger's Unix socket: its replicas' deliveries without a Ray call each.

Runs in the node merger actor (:mod:`ray_monitor.node.actor`), on its event loop. It
decides who may deliver over the socket (a peer of the merger's own uid, checked with
``SO_PEERCRED`` before a byte is read), what a connection may send (frames of the wire
in :mod:`ray_monitor.common.node_socket`, each a delivery), and what ends a connection
(a bad frame: counted and logged once per cause; the replica delivers by Ray call or
connects again). What a delivery means is the merger's ``ingest``'s: each frame is
handed to it and its answer goes back in a frame with the same delivery id, once the
aggregator took the forward that carried it. Receiving a Ray actor call costs its
process 0.5-1 ms; reading a frame from a socket costs tens of microseconds.

The socket lives in a directory only the merger's uid can enter (made 0700, refused if
it is someone else's), is made 0600, and is unlinked and bound anew by a restarted
merger (the replicas connected to the old one saw their connection end and send what
was in flight again).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from typing import Any, Awaitable, Callable, Optional

from ray_monitor.common import node_socket as wire

__all__ = ["LocalServer"]

log = logging.getLogger(__name__)

Deliver = Callable[[list, Any], Awaitable[Any]]


class LocalServer:
    """Listens at ``path`` and hands each frame to ``deliver(snaps, kept_since)``.

    ``counts`` (the merger's, reported with every forward) gets ``socket_calls`` (frames
    delivered), ``socket_connections``, ``socket_bad_frames`` and ``socket_refused``
    (peers of another uid)."""

    def __init__(self, path: Optional[str], deliver: Deliver, counts: dict) -> None:
        self.path = path
        self._deliver = deliver
        self.counts = counts
        for key in ("socket_calls", "socket_connections", "socket_bad_frames",
                    "socket_refused"):
            counts.setdefault(key, 0)
        self._server: Optional[asyncio.base_events.Server] = None
        self._starting: Optional[asyncio.Task] = None
        self._logged: set[str] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def listening(self) -> bool:
        return self._server is not None

    def ensure(self) -> None:
        """Starts listening on the running loop unless it does or tried (once per merger)."""
        if self.path is not None and self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(self.start())

    async def start(self) -> bool:
        """Binds the socket; False (logged once) when it cannot: replicas then call."""
        try:
            directory = os.path.dirname(self.path)
            os.makedirs(directory, mode=0o700, exist_ok=True)
            why = wire.check_dir(directory)
            if why is not None:
                raise PermissionError(f"{directory}: {why}")
            try:
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)  # a previous merger of this node (restarted)
            except FileNotFoundError:
                pass
            self._server = await asyncio.start_unix_server(self._serve, path=self.path)
            os.chmod(self.path, 0o600)
            return True
        except Exception as e:
            self._log_once("listen", e)
            return False

    def close(self) -> None:
        """Stops listening and ends every connection (their replicas send again)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            uid = wire.peer_uid(writer.get_extra_info("socket"))
        except Exception as e:
            uid, err = -1, e
        else:
            err = None
        if uid != os.getuid():
            self.counts["socket_refused"] += 1
            self._log_once("refused", err or PermissionError(f"peer uid {uid} is not "
                                                             f"the merger's {os.getuid()}"))
            writer.close()
            return
        self.counts["socket_connections"] += 1
        pending: set[asyncio.Task] = set()
        self._writers.add(writer)
        try:
            while True:
                try:
                    header = await reader.readexactly(wire.HEADER.size)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the replica went away (or restarts): nothing to answer
                (n,) = wire.HEADER.unpack(header)
                try:
                    if n > wire.MAX_FRAME:
                        raise wire.FrameError(f"a frame of {n} bytes is over the "
                                              f"{wire.MAX_FRAME} limit")
                    body = await reader.readexactly(n)
                    did, snaps, kept_since = wire.decode(body, 3)
                    if not isinstance(snaps, list):
                        raise wire.FrameError(f"snapshots must be a list, got "
                                              f"{type(snaps).__name__}")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                except wire.FrameError as e:
                    self.counts["socket_bad_frames"] += 1
                    self._log_once("bad_frame", e)
                    return
                self.counts["socket_calls"] += 1
                task = asyncio.get_running_loop().create_task(
                    self._answer(writer, did, snaps, kept_since))
                pending.add(task)
                task.add_done_callback(pending.discard)
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, did: int, snaps: list,
                      kept_since: Any) -> None:
        try:
            reply = await self._deliver(snaps, kept_since)
        except Exception as e:  # as a failed Ray call: the replica sends it again
            self._log_once(f"deliver:{type(e).__name__}", e)
            reply = {wire.FAILED: f"{type(e).__name__}: {e}"[:500]}
        try:
            if not writer.is_closing():  # else the replica sends it again; deduped upstream
                writer.write(wire.encode((did, reply)))
        except Exception as e:
            self._log_once(f"answer:{type(e).__name__}", e)

    def _log_once(self, cause: str, exc: BaseException) -> None:
        if cause not in self._logged:
            self._logged.add(cause)
            log.warning("ray-monitor node merger socket %s: %s (%r); logged once",
                        self.path, cause, exc)
