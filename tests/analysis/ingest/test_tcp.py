"""The TCP tunnel receiver under hostile peers: connection limit, idle timeout, bounded
buffers, and the fd limit — on real loopback sockets, some against a real ``vspan analyze``
process (its memory read from /proc), one in a child process whose fd limit is lowered.

What each test expects is what it did itself: how many connections it opened, what it sent,
which of its sockets the server closed.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import resource
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vspan.analysis.ingest.receivers import Chunk, ReceiverConfig, TcpReceiver
from vspan.wire.tunnel import HEADER, MAGIC, VERSION, encode_message
from vspan_testing.measured_analyzer import MeasuredAnalyzer, metric

FRAME = bytes(12) + b"\x89\x26" + bytes(4) + b"\x08\x00" + bytes(40)
LOCAL = ("127.0.0.1", 0)


def message(cid: int, seq: int, frames: int = 2) -> bytes:
    return encode_message(collector_id=cid, boot_id=1, seq=seq, frames=[FRAME] * frames,
                          ts_ns=list(range(frames)))  # fmt: skip


class Drain:
    """Takes the receiver's chunks (as the engine would), counting their messages."""

    def __init__(self) -> None:
        self.sink: queue.Queue[Chunk] = queue.Queue()
        self.messages = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                chunk = self.sink.get(timeout=0.05)
            except queue.Empty:
                continue
            self.messages += chunk.sizes.size
            chunk.release()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def drain() -> Iterator[Drain]:
    d = Drain()
    yield d
    d.close()


def closed_by_peer(sock: socket.socket, wait_s: float = 0.0) -> bool:
    """Whether the server closed ``sock`` (EOF or reset), waiting up to ``wait_s``."""
    poller = select.poll()  # not select(): the flood's descriptors go beyond 1024
    poller.register(sock, select.POLLIN)
    if not poller.poll(wait_s * 1000):
        return False
    try:
        return sock.recv(1, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def wait(check: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_slowloris_is_closed_after_the_idle_timeout_a_steady_sender_is_not(
    drain: Drain,
) -> None:
    config = ReceiverConfig(poll_s=0.05, tcp_idle_timeout_s=1.0)
    receiver = TcpReceiver(LOCAL, sink=drain.sink, config=config)
    receiver.start()
    try:
        steady = socket.create_connection(receiver.address)
        slow = socket.create_connection(receiver.address)
        silent = socket.create_connection(receiver.address)
        # The slowloris announces a 1,000-byte message and trickles it, a byte every 0.2 s:
        # it would take 200 s. The steady sender completes a message every 0.4 s.
        slow.sendall(HEADER.pack(MAGIC, VERSION, 0, 1000, 9, 1, 0, 0, 0))
        closed: dict[str, float] = {}
        sent = 0
        started = time.monotonic()
        for i in range(25):  # 5 s, five times the idle timeout
            if "slow" not in closed:
                try:
                    slow.send(b"\x00")
                except OSError:
                    closed["slow"] = time.monotonic() - started
            for name, sock in (("slow", slow), ("silent", silent), ("steady", steady)):
                if name not in closed and closed_by_peer(sock):
                    closed[name] = time.monotonic() - started
            if i % 2 == 0 and "steady" not in closed:
                steady.sendall(message(4, sent))
                sent += 1
            time.sleep(0.2)
        assert sorted(closed) == ["silent", "slow"], closed  # the steady sender stays
        wait(lambda: drain.messages == sent)
        assert receiver.closed_idle == 2
        assert receiver.counters()["open_connections"] == 1
        for sock in (steady, slow, silent):
            sock.close()
    finally:
        receiver.stop()


def test_a_header_announcing_more_than_max_message_closes_the_stream_at_once(
    drain: Drain,
) -> None:
    receiver = TcpReceiver(LOCAL, sink=drain.sink, config=ReceiverConfig(poll_s=0.05))
    receiver.start()
    try:
        with socket.create_connection(receiver.address) as conn:
            # 1 MB announced: more than a datagram carries (the default bound), nothing sent.
            conn.sendall(HEADER.pack(MAGIC, VERSION, 0, 1 << 20, 9, 1, 0, 0, 0))
            assert closed_by_peer(conn, wait_s=5.0)
        wait(lambda: drain.sink.qsize() == 0 and receiver.closed_invalid == 1)
        assert receiver.rejected == {"bad_length": 1}
    finally:
        receiver.stop()


def test_connections_beyond_the_limit_are_refused_and_counted(drain: Drain) -> None:
    config = ReceiverConfig(poll_s=0.05, tcp_max_connections=20)
    receiver = TcpReceiver(LOCAL, sink=drain.sink, config=config)
    receiver.start()
    try:
        socks = [socket.create_connection(receiver.address) for _ in range(50)]
        wait(lambda: receiver.connections + receiver.rejected_connections == 50)
        time.sleep(0.2)
        closed = [s for s in socks if closed_by_peer(s, wait_s=0.0)]
        assert (len(closed), receiver.rejected_connections) == (30, 30)
        assert receiver.counters()["open_connections"] == 20
        held = [s for s in socks if s not in closed]
        for i, s in enumerate(held):
            s.sendall(message(3, i))
        wait(lambda: drain.messages == 20)
        for s in socks:
            s.close()
        wait(lambda: receiver.counters()["open_connections"] == 0)
        with socket.create_connection(receiver.address) as again:  # room again
            again.sendall(message(3, 100))
            wait(lambda: drain.messages == 21)
    finally:
        receiver.stop()


def test_2000_connections_against_vspan_analyze_stay_within_the_limit_and_memory(
    tmp_path: Path,
) -> None:
    """2,000 connections, each holding a 60,000-byte message it never finishes, against
    ``vspan analyze --tcp-max-connections 256``: 256 are served, 1,744 closed at once; the
    analyzer's resident memory grows by less than 64 MB (256 buffers of at most 128 KB, and
    slack); the API answers throughout; and a collector is served once the flood is gone.
    (With a thread and up to 34 MB per connection and no limit, this grew by hundreds of
    MB.)"""
    need = 2200  # this process holds the 2,000 client sockets
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"needs {need} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    with MeasuredAnalyzer(tmp_path / "data", "--tcp-max-connections", "256",
                         "--tcp-idle-timeout", "120") as analyzer:  # fmt: skip
        tcp = analyzer.addresses["tcp"]
        with socket.create_connection(tcp) as warm:  # the engine's kernels are loaded
            warm.sendall(message(7, 0))
        analyzer.wait_for(lambda: collector_frames(analyzer, 7) == 2)
        before = analyzer.rss()
        partial = HEADER.pack(MAGIC, VERSION, 0, 60_024, 9, 1, 0, 5000, 0) + bytes(59_000)
        socks = []
        for _ in range(2000):
            s = socket.create_connection(tcp)
            s.settimeout(2.0)
            with contextlib.suppress(OSError):  # refused at once: reset before the data is out
                s.sendall(partial)
            socks.append(s)
        assert analyzer.get("/healthz")[0] == 200  # the API answers during the flood
        time.sleep(1.0)
        closed = sum(closed_by_peer(s) for s in socks)
        grown = analyzer.rss() - before
        assert closed == 2000 - 256
        assert grown < 64 << 20, f"resident memory grew by {grown / 1e6:.0f} MB"
        for s in socks:
            s.close()
        with socket.create_connection(tcp) as collector:
            collector.sendall(message(7, 1))
            analyzer.wait_for(lambda: collector_frames(analyzer, 7) == 4)


def collector_frames(analyzer: MeasuredAnalyzer, cid: int) -> float | None:
    status, body = analyzer.get("/metrics")
    assert status == 200
    return metric(body.decode(), "vspan_collector_frames_total", [("collector_id", str(cid))])


def test_vspan_analyze_at_a_low_fd_limit_keeps_serving_the_api(tmp_path: Path) -> None:
    """With 256 file descriptors, ``vspan analyze`` lowers its TCP connection limit so that
    128 stay free: 600 connections do not take the API down, and once they are gone a
    collector is served."""

    def low_fd_limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    with MeasuredAnalyzer(tmp_path / "data", preexec=low_fd_limit) as analyzer:
        tcp = analyzer.addresses["tcp"]
        socks = [socket.create_connection(tcp) for _ in range(600)]
        time.sleep(1.0)
        for _ in range(5):
            assert analyzer.get("/healthz", timeout_s=5.0)[0] == 200
            assert analyzer.get("/metrics", timeout_s=5.0)[0] == 200
        held = sum(not closed_by_peer(s) for s in socks)
        assert 0 < held <= 256 - 128
        assert analyzer.count("serving at most") == 1  # the lowered limit is logged
        for s in socks:
            s.close()
        with socket.create_connection(tcp) as collector:
            collector.sendall(message(7, 0))
            analyzer.wait_for(lambda: collector_frames(analyzer, 7) == 2)


_AT_THE_FD_LIMIT = textwrap.dedent(
    """
    import json, logging, os, queue, resource, sys, threading, time
    from vspan.analysis.ingest.receivers import ReceiverConfig, TcpReceiver

    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    lines = []
    class Count(logging.Handler):
        def emit(self, record):
            if "accept" in record.getMessage():
                lines.append(record.getMessage())
    logging.getLogger("vspan.analysis.ingest.receivers").addHandler(Count())
    sink = queue.Queue()
    receiver = TcpReceiver(("127.0.0.1", 0), sink=sink, config=ReceiverConfig(poll_s=0.05))
    receiver.start()
    messages = [0]
    def drain():
        while True:
            chunk = sink.get()
            messages[0] += chunk.sizes.size
            chunk.release()
    threading.Thread(target=drain, daemon=True).start()
    loop = [t for t in threading.enumerate() if t.name.startswith("vspan-tcp")][0]
    stat = os.open(f"/proc/self/task/{loop.native_id}/stat", os.O_RDONLY)  # opened now
    def cpu():
        fields = os.pread(stat, 4096, 0).decode().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    dummies = []
    while True:  # take every descriptor left
        try:
            dummies.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            break
    print(json.dumps({"port": receiver.address[1]}), flush=True)
    for line in sys.stdin:
        if line.strip() == "free":
            for fd in dummies:
                os.close(fd)
            dummies = []
        c = receiver.counters()
        print(json.dumps({"cpu": cpu(), "log_lines": len(lines), "messages": messages[0],
                          "accept_errors": c.get("accept_errors"),
                          "connections": c["connections"]}), flush=True)
    """
)


def test_at_the_fd_limit_accepting_backs_off_instead_of_spinning() -> None:
    """In a process whose every descriptor is taken, 40 peers wait in the backlog: for 3 s
    accept fails; the receiver's thread must not spin (its CPU time stays under 0.5 s and
    it logs one line, where a loop retrying at once logs thousands), and once
    descriptors are free again every peer is served."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen([sys.executable, "-c", _AT_THE_FD_LIMIT], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    assert child.stdin is not None
    assert child.stdout is not None

    def ask(command: str) -> dict[str, float]:
        assert child.stdin is not None
        assert child.stdout is not None
        child.stdin.write(command + "\n")
        child.stdin.flush()
        reply: dict[str, float] = json.loads(child.stdout.readline())
        return reply

    try:
        port = json.loads(child.stdout.readline())["port"]
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
        before = ask("stats")
        time.sleep(3.0)
        during = ask("stats")
        assert during["connections"] == 0
        assert during["cpu"] - before["cpu"] < 0.5, during
        assert during["log_lines"] <= 1, during  # at most one line per 10 s
        assert during["accept_errors"] is not None
        assert during["accept_errors"] >= 1
        ask("free")
        for i, s in enumerate(socks):
            s.sendall(message(5, i))
        deadline = time.monotonic() + 10
        while (now := ask("stats"))["messages"] < 40:
            assert time.monotonic() < deadline, now
            time.sleep(0.1)
        assert now["connections"] == 40
        for s in socks:
            s.close()
    finally:
        child.stdin.close()
        child.wait(10)
        child.stdout.close()
