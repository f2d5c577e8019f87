"""``vspan analyze`` as a real process whose resources a test measures: started the way the
README says, on loopback ports the kernel picks, optionally under lowered limits
(``preexec``, e.g. ``setrlimit``), with its stderr kept in memory (log lines can be counted)
and its resident memory read from /proc. For the hostile-input tests; the lab's deployment
tests use ``analyzer_proc``."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["MeasuredAnalyzer", "metric"]

_READY = re.compile(r"receiving on (?P<where>.*?); API on http://(?P<http>[^/ ]+)/")


class MeasuredAnalyzer:
    """``vspan analyze ARGS`` (udp, tcp and http on 127.0.0.1 port 0 unless given)."""

    def __init__(
        self,
        data_dir: Path,
        *args: str,
        preexec: Callable[[], None] | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        defaults = {"--udp": "127.0.0.1:0", "--tcp": "127.0.0.1:0", "--http": "127.0.0.1:0"}
        given = [a for a in defaults if a in args]
        extra = [x for flag, value in defaults.items() if flag not in given for x in (flag, value)]
        cmd = [sys.executable, "-m", "vspan.cli", "analyze", "--data-dir", str(data_dir),
               *extra, *args]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            preexec_fn=preexec,  # noqa: PLW1509 - only setrlimit, before exec
        )  # fmt: skip
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.addresses: dict[str, tuple[str, int]] = {}
        self.http = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout_s) or not self.http:
            self.__exit__()
            raise RuntimeError("vspan analyze did not start:\n" + "".join(self.lines[-40:]))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            match = _READY.search(line)
            if match is not None:
                for part in match.group("where").split(", "):
                    kind, _, address = part.partition(" ")
                    host, _, port = address.rpartition(":")
                    self.addresses[kind] = (host, int(port))
                self.http = "http://" + match.group("http")
                self._ready.set()
        self._ready.set()

    def rss(self) -> int:
        """Resident memory of the process now, in bytes."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert match is not None
        return int(match.group(1)) * 1024

    def get(self, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
        """(status, body) of a GET on the API."""
        try:
            with urllib.request.urlopen(self.http + path, timeout=timeout_s) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def count(self, needle: str) -> int:
        """Lines of stderr so far that contain ``needle``."""
        return sum(needle in line for line in list(self.lines))

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then wait; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def wait_for(self, check: Callable[[], bool], timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError("timed out; last log lines:\n" + "".join(self.lines[-20:]))
            time.sleep(0.05)

    def __enter__(self) -> MeasuredAnalyzer:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.kill()
            self._reader.join(5)
            if self.proc.stderr is not None:
                self.proc.stderr.close()


def metric(text: str, name: str, labels: Sequence[tuple[str, str]] = ()) -> float | None:
    """The value of one sample of a Prometheus text exposition (labels matched as given)."""
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels):
            return float(value)
    return None
