"""A replica's deliveries over its node merger's Unix socket (issue 15): the frames, who may
connect, what a bad frame does, and the Ray-call fallback when there is no socket or it
breaks. Real Unix sockets in a private temporary directory; the merger's side is the real
LocalServer on an event loop of its own, answering as the merger's ``ingest`` does."""

from __future__ import annotations

import asyncio
import os
import pickle
import shutil
import socket
import tempfile
import threading

import pytest

from ray_monitor.common import node_socket as wire
from ray_monitor.node.local_socket import LocalServer
from ray_monitor.replica.delivery import ActorSink
from ray_monitor.replica.local_sink import LocalSink, with_local_socket
from tests.helpers import Clock


class RayCalls(ActorSink):
    """The Ray-call path, recorded: what would have gone by ``ingest.remote``."""

    def __init__(self) -> None:
        super().__init__(node_id="ab" * 28)
        self.batches: list[list] = []

    def send(self, snapshots):
        if snapshots:
            self.batches.append(list(snapshots))
        return []


class Merger:
    """A LocalServer on its own loop; deliveries answered when ``release`` is set
    (the aggregator took the forward), as the merger's ``ingest`` answers."""

    def __init__(self, path: str) -> None:
        self.counts: dict = {}
        self.got: list = []
        self.fail = 0  # deliveries that raise, next
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.release = self.call(self._event())
        self.server = LocalServer(path, self._deliver, self.counts)
        assert self.call(self.server.start())

    async def _event(self):
        return asyncio.Event()

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _deliver(self, snaps, kept_since):
        self.got.append((list(snaps), kept_since))
        n = len(self.got)  # this delivery's number, before waiting: others arrive meanwhile
        if self.fail:
            self.fail -= 1
            raise RuntimeError("the merger's ingest failed")
        await self.release.wait()
        return {"epoch": "e", "seq": n, "kept": [f"t{n}"]}

    def answer(self) -> None:
        self.loop.call_soon_threadsafe(self.release.set)

    def stop(self) -> None:
        async def close():  # as the process dies: connections end, waits are cancelled
            self.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
        self.call(close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def sock_dir(tmp_path):
    d = tmp_path / "sockets" / wire.SOCKET_DIR
    d.mkdir(parents=True, mode=0o700)
    os.chmod(d, 0o700)
    return d


def wait_for(fn, what: str):
    """Polls ``fn`` (socket answers arrive on another thread); fails naming ``what``."""
    ev = threading.Event()
    for _ in range(3000):  # up to 30 s on a loaded machine
        if fn():
            return
        ev.wait(0.01)
    raise AssertionError(f"never: {what}")


def test_frames_round_trip_and_a_partial_frame_waits_for_its_rest():
    a, b = wire.encode((1, ["s1", "s2"], ("e", 3))), wire.encode((2, {"seq": 4}))
    buf = bytearray(a + b[:5])
    bodies = wire.split_frames(buf)
    assert [wire.decode(x, 3) for x in bodies] == [(1, ["s1", "s2"], ("e", 3))]
    assert bytes(buf) == b[:5]  # the partial frame stays for the next read
    buf += b[5:]
    assert [wire.decode(x, 2) for x in wire.split_frames(buf)] == [(2, {"seq": 4})]
    assert buf == bytearray()


def test_bad_frames_are_refused_naming_what_is_wrong():
    with pytest.raises(wire.FrameError, match="over the"):
        wire.split_frames(bytearray(wire.HEADER.pack(wire.MAX_FRAME + 1)))
    with pytest.raises(wire.FrameError, match="unpickle"):
        wire.decode(b"not a pickle", 3)
    with pytest.raises(wire.FrameError, match="delivery id"):
        wire.decode(pickle.dumps(("x", [], None)), 3)
    with pytest.raises(wire.FrameError, match="tuple of 2"):
        wire.decode(pickle.dumps((1, [], None)), 2)


def test_each_node_has_its_own_socket_and_a_path_too_long_means_ray_calls():
    a, b = "a1" * 28, "b2" * 28
    pa, pb = wire.socket_path("/tmp/ray/session_x", a), wire.socket_path("/tmp/ray/session_x", b)
    assert pa != pb and a[:16] in pa and pa.startswith("/tmp/ray/session_x/sockets/ray_monitor/")
    assert wire.socket_path("/t/" + "x" * 100, a) is None  # would not fit sun_path
    assert wire.socket_path(None, a) is None and wire.socket_path("/tmp", "") is None


def test_only_a_private_directory_of_this_uid_is_trusted(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    os.chmod(d, 0o755)
    assert "mode 755" in wire.check_dir(str(d))
    os.chmod(d, 0o700)
    assert wire.check_dir(str(d)) is None
    assert "missing" in wire.check_dir(str(tmp_path / "nope"))
    link = tmp_path / "link"
    link.symlink_to(d)
    assert wire.check_dir(str(link)) == "not a directory"
    if os.getuid() == 0:  # root can give it away: someone else's directory is refused
        os.chown(d, 4242, -1)
        assert "owned by uid 4242" in wire.check_dir(str(d))


def test_deliveries_go_over_the_socket_and_answers_are_read_at_the_next_flush(sock_dir):
    path = str(sock_dir / "node-x.sock")
    merger = Merger(path)
    try:
        assert (os.stat(path).st_mode & 0o777) == 0o600
        calls, kept = RayCalls(), []
        sink = LocalSink(calls, path, clock=Clock(1000.0))
        sink.on_kept = kept.append
        assert sink.send(["s1"]) == [] and sink.connected
        wait_for(lambda: merger.got, "the merger got the delivery")
        assert merger.got == [(["s1"], None)] and merger.counts["socket_calls"] == 1
        assert sink.send(["s2"]) == []  # no answer yet: both in flight, nothing re-sent
        merger.answer()
        wait_for(lambda: len(merger.got) == 2, "the second delivery")
        wait_for(lambda: (sink._poll() or True) and not sink._in_flight, "both answers")
        assert kept == [["t1"], ["t2"]] and sink.fallback.kept_cursor == ("e", 2)
        assert sink.send(["s3"]) == []
        wait_for(lambda: len(merger.got) == 3, "the third delivery")
        assert merger.got[2] == (["s3"], ("e", 2))  # the cursor travels with the frame
        assert calls.batches == [] and merger.counts["socket_connections"] == 1
    finally:
        merger.stop()


def test_without_a_socket_the_replica_delivers_by_ray_call_then_switches(sock_dir):
    path = str(sock_dir / "node-y.sock")
    calls = RayCalls()
    clock = Clock(1000.0)
    sink = LocalSink(calls, path, clock=clock)
    assert sink.send(["s1"]) == [] and calls.batches == [["s1"]] and not sink.connected
    merger = Merger(path)  # the node's merger starts
    try:
        assert sink.send(["s2"]) == [] and calls.batches[-1] == ["s2"]  # looks every 2 s
        clock.advance(2.0)
        assert sink.send(["s3"]) == [] and sink.connected
        wait_for(lambda: merger.got, "the delivery over the socket")
        assert merger.got == [(["s3"], None)] and len(calls.batches) == 2
    finally:
        merger.stop()


def test_a_merger_restart_sends_what_was_in_flight_again_then_reconnects(sock_dir):
    path = str(sock_dir / "node-z.sock")
    merger = Merger(path)
    calls, clock = RayCalls(), Clock(1000.0)
    sink = LocalSink(calls, path, clock=clock)
    assert sink.send(["s1"]) == [] and sink.send(["s2"]) == []
    wait_for(lambda: len(merger.got) == 2, "two deliveries in flight")
    merger.stop()  # dies before answering
    wait_for(lambda: sink.send([]) == [] and not sink.connected, "the broken connection seen")
    assert calls.batches == [["s1", "s2"]]  # re-sent, in order, by Ray call meanwhile
    merger = Merger(path)  # restarted: the same path, bound anew
    try:
        clock.advance(2.0)
        assert sink.send(["s3"]) == [] and sink.connected
        wait_for(lambda: merger.got, "the delivery to the restarted merger")
        assert merger.got == [(["s3"], None)]
    finally:
        merger.stop()


def test_a_delivery_that_fails_in_the_merger_is_sent_again(sock_dir):
    path = str(sock_dir / "node-u.sock")
    merger = Merger(path)
    merger.fail = 1
    merger.answer()
    failures = []
    try:
        sink = LocalSink(RayCalls(), path, clock=Clock(1000.0),
                         on_failure=lambda cause, exc: failures.append(cause))
        assert sink.send(["s1"]) == []
        wait_for(lambda: merger.got, "the first try")
        # its failure answer is read at the next flush, and the delivery goes again first
        wait_for(lambda: sink.send([]) == [] and len(merger.got) == 2, "the second try")
        assert merger.got == [(["s1"], None), (["s1"], None)]
        assert failures == ["node_socket_merger_failed:RuntimeError"]
        wait_for(lambda: (sink._poll() or True) and not sink._in_flight, "its answer")
        assert sink.fallback.kept_cursor == ("e", 2)
    finally:
        merger.stop()


def test_a_bad_frame_closes_that_connection_counted_and_others_go_on(sock_dir, caplog):
    path = str(sock_dir / "node-w.sock")
    merger = Merger(path)
    try:
        bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bad.connect(path)
        bad.sendall(wire.HEADER.pack(5) + b"junk!")
        bad.settimeout(10)
        assert bad.recv(10) == b""  # closed by the merger
        huge = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        huge.connect(path)
        huge.sendall(wire.HEADER.pack(wire.MAX_FRAME + 1))
        huge.settimeout(10)
        assert huge.recv(10) == b""
        wait_for(lambda: merger.counts["socket_bad_frames"] == 2, "both counted")
        assert sum("bad_frame" in r.getMessage() for r in caplog.records) == 1  # logged once
        sink = LocalSink(RayCalls(), path, clock=Clock(1000.0))
        assert sink.send(["ok"]) == []
        wait_for(lambda: merger.got, "a good delivery after the bad ones")
        assert merger.got == [(["ok"], None)]
    finally:
        merger.stop()


def test_a_peer_of_another_uid_is_refused_before_a_byte_is_read():
    if os.getuid() != 0:
        pytest.skip("only root can connect as another uid")
    base = tempfile.mkdtemp()  # pytest's tmp_path is 0700: the other uid must reach it
    sock_dir = os.path.join(base, "sockets", wire.SOCKET_DIR)
    os.makedirs(sock_dir, mode=0o700)
    path = os.path.join(sock_dir, "node-v.sock")
    merger = Merger(path)
    for d in (base, os.path.dirname(sock_dir), sock_dir):  # let it reach the socket:
        os.chmod(d, 0o711)  # the peer check must hold on its own
    os.chmod(path, 0o666)
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(r)
            code = b"?"
            try:
                os.setuid(4242)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(path)
                s.sendall(wire.encode((1, ["evil"], None)))
                s.settimeout(10)
                code = b"c" if s.recv(10) == b"" else b"a"
            except (BrokenPipeError, ConnectionResetError):
                code = b"c"  # closed by the merger before the frame was all written
            except PermissionError:
                code = b"p"  # could not reach the socket: the test would prove nothing
            except Exception:
                code = b"e"
            os.write(w, code)
            os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        assert os.read(r, 1) == b"c"  # the merger closed the connection
        assert merger.counts["socket_refused"] == 1 and merger.got == []
    finally:
        merger.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_no_socket_for_a_replica_outside_ray_or_when_turned_off(monkeypatch):
    calls = RayCalls()
    assert with_local_socket(None, "ab" * 28) is None
    assert with_local_socket(calls, None) is calls
    monkeypatch.setattr(wire, "session_dir", lambda: None)  # not in a Ray worker
    assert with_local_socket(calls, "ab" * 28) is calls
    monkeypatch.setattr(wire, "session_dir", lambda: "/tmp/ray/session_x")
    assert isinstance(with_local_socket(calls, "ab" * 28), LocalSink)
    monkeypatch.setenv("RAY_MONITOR_NODE_SOCKET", "0")
    assert with_local_socket(calls, "ab" * 28) is calls


def test_the_socket_is_closed_when_the_replicas_recorder_stops(sock_dir, monkeypatch):
    """Runtime.close ends the replica's connection after the last flush (a closed
    Runtime in a live process kept its socket open before); the last frame is written
    whole and delivered; closing twice, or a sink whose close raises, never raises."""
    from ray_monitor import monitor

    for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)
    path = str(sock_dir / "node-c.sock")
    merger = Merger(path)
    try:
        @monitor(flush_interval_s=3600.0)
        class Echo:
            def __call__(self, x):
                return x

        Echo()(1)
        rt = Echo.__ray_monitor__
        sink = LocalSink(RayCalls(), path, clock=Clock(1000.0))
        rt.state.recorder.sink = sink
        assert sink.send(["s0"]) == [] and sink.connected
        fd = sink._sock
        merger.answer()  # the merger answers as the aggregator takes each forward
        rt.close()  # the last flush goes over the socket, then the socket is closed
        assert not sink.connected and fd.fileno() == -1
        wait_for(lambda: len(merger.got) == 2, "the last flush's delivery")
        assert merger.got[1][0] and merger.got[1][0][0].identity.deployment
        sink.close()  # again: nothing to do

        class Broken:
            def send(self, snaps):
                return []

            def close(self):
                raise OSError("bad close")

        @monitor(flush_interval_s=3600.0)
        class Other:
            def __call__(self, x):
                return x

        Other()(1)
        st = Other.__ray_monitor__.state
        st.recorder.sink = Broken()
        Other.__ray_monitor__.close()  # counted, not raised
        assert st.recorder.self_errors.snapshot().get("sink_close_failed:OSError") == 1
    finally:
        merger.stop()
