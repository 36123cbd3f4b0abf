"""The wire of a node's local socket: where it is, who may speak on it, and its frames.

Imported by the node merger (:mod:`ray_monitor.node.local_socket`, the server) and by
every replica (:mod:`ray_monitor.replica.local_sink`, the client) on the same node. It
decides the socket's path (from Ray's session directory and the node id, so each node
of a cluster started on one machine has its own), which directory and peer are
trusted, and how a message is framed. Changing any of it is a change of the wire
contract between a replica and its node's merger.

Frames are a 4-byte big-endian length and a pickle: ``(delivery id, snapshots, kept
cursor)`` from a replica, ``(delivery id, reply)`` back (``{FAILED: why}`` where a Ray
call would have raised). Pickle is only ever read from a
peer of the same uid (``SO_PEERCRED``), in a directory only that uid can enter, as Ray
itself trusts the processes of its own user on a node.
"""

from __future__ import annotations

import os
import pickle
import socket
import stat
import struct
from typing import Any, Optional

__all__ = ["FAILED", "FrameError", "HEADER", "MAX_FRAME", "SOCKET_DIR", "check_dir", "decode",
           "encode", "peer_uid", "session_dir", "socket_path", "split_frames"]

#: Length prefix of every frame.
HEADER = struct.Struct(">I")
#: The largest frame either side accepts (a replica sends a bigger delivery by Ray call).
MAX_FRAME = 64 * 1024 * 1024
#: The key of an answer saying the delivery failed in the merger (a raising Ray call's
#: equivalent): the replica sends it again.
FAILED = "ray_monitor_failed"
#: Under Ray's session directory's ``sockets/`` (where Ray keeps its own node sockets).
SOCKET_DIR = "ray_monitor"
#: ``sun_path`` holds 108 bytes with its terminating NUL.
_MAX_PATH = 107
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class FrameError(ValueError):
    """A frame that is too long or does not unpickle to what the wire carries."""


def socket_path(session_dir: str, node_id: str) -> Optional[str]:
    """The node's socket, or None when the path would not fit ``sun_path`` (then
    replicas deliver by Ray call). The node id is part of the name: a cluster started
    on one machine (``ray.cluster_utils.Cluster``) has several nodes, one session dir."""
    if not session_dir or not node_id:
        return None
    path = os.path.join(session_dir, "sockets", SOCKET_DIR, f"node-{node_id[:16]}.sock")
    return path if len(os.fsencode(path)) <= _MAX_PATH else None


def session_dir() -> Optional[str]:
    """Ray's session directory as this worker's node has it (None outside a Ray worker)."""
    try:
        from ray._private.worker import global_worker

        return global_worker.node.get_session_dir_path()
    except Exception:  # not connected, or Ray moved it: no socket, Ray calls instead
        return None


def check_dir(path: str) -> Optional[str]:
    """Why the directory ``path`` is not to be trusted (None: it is): it must be a real
    directory (not a link) owned by this process's uid that no one else may enter."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"missing ({e.strerror})"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not {os.getuid()}"
    if st.st_mode & 0o077:
        return f"mode {stat.S_IMODE(st.st_mode):o}, not 700"
    return None


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket."""
    _, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return uid


def encode(message: Any) -> bytes:
    """One frame; raises :class:`FrameError` past :data:`MAX_FRAME`."""
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(body) > MAX_FRAME:
        raise FrameError(f"a frame of {len(body)} bytes is over the {MAX_FRAME} limit")
    return HEADER.pack(len(body)) + body


def decode(body: bytes, size: int) -> tuple:
    """A frame's body as the tuple of ``size`` items the wire carries, whose first item
    is the delivery id (an int); anything else raises :class:`FrameError`."""
    try:
        message = pickle.loads(body)
    except Exception as e:
        raise FrameError(f"does not unpickle: {type(e).__name__}") from None
    if not isinstance(message, tuple) or len(message) != size \
            or not isinstance(message[0], int) or isinstance(message[0], bool):
        raise FrameError(f"expected a tuple of {size} starting with a delivery id, "
                         f"got {type(message).__name__}")
    return message


def split_frames(buf: bytearray) -> list[bytes]:
    """Takes the complete frames' bodies off the front of ``buf`` (a partial one stays);
    raises :class:`FrameError` for a length over :data:`MAX_FRAME`."""
    out = []
    while len(buf) >= HEADER.size:
        (n,) = HEADER.unpack_from(buf)
        if n > MAX_FRAME:
            raise FrameError(f"a frame of {n} bytes is over the {MAX_FRAME} limit")
        if len(buf) < HEADER.size + n:
            break
        out.append(bytes(buf[HEADER.size:HEADER.size + n]))
        del buf[:HEADER.size + n]
    return out
