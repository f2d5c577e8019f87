"""``vspan analyze`` as the README runs it: a subprocess, its start line, its stderr, its stop.

``AnalyzerProcess`` starts the installed command (``spawn`` may run it elsewhere, such as
``Lab.spawn`` in a network namespace), waits for the start line and reads from it where the kernel bound the
receivers and the API (``--udp 127.0.0.1:0`` works), keeps stderr in a file, and stops the
process with SIGTERM (it finishes flows and writes them) or SIGKILL (nothing is flushed).
``summary()`` parses the exit line into numbers.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vspan_testing.netlab import vspan_command

__all__ = ["AnalyzerProcess", "Summary"]

_STARTED = re.compile(
    r"^vspan analyze: receiving on (?P<where>.*); API on (?P<api>http://\S+/) ; data in (?P<data>.+)$",
    re.MULTILINE,
)
_STOPPED = re.compile(
    r"^vspan analyze: stopped: (?P<frames>[\d,]+) frames, (?P<finished>[\d,]+) flows finished, "
    r"(?P<stored>[\d,]+) flow records stored(?:, (?P<lost>[\d,]+) not stored \((?P<why>[^)]*)\))?",
    re.MULTILINE,
)


def _int(text: str | None) -> int:
    return int((text or "0").replace(",", ""))


class Summary:
    """The numbers of the analyzer's exit line."""

    def __init__(self, match: re.Match[str]) -> None:
        self.frames = _int(match["frames"])
        self.finished = _int(match["finished"])
        self.stored = _int(match["stored"])
        self.not_stored = _int(match["lost"])
        self.why = match["why"] or ""
        self.line = match.group(0)


class AnalyzerProcess:
    """One ``vspan analyze`` run; ``args`` are its flags (``--data-dir``, ``--udp`` ...)."""

    def __init__(
        self, args: Sequence[str], *, stderr_path: Path, spawn: Callable[..., Any] | None = None
    ) -> None:
        self.stderr_path = stderr_path
        self._log = stderr_path.open("w")
        argv = [*vspan_command(), "analyze", *args]
        quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": self._log}
        self.proc: subprocess.Popen[Any] = (spawn or subprocess.Popen)(argv, **quiet)
        self.udp: tuple[str, int] | None = None
        self.tcp: tuple[str, int] | None = None
        self.api = ""

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_started(self, timeout: float = 60.0) -> AnalyzerProcess:
        """Until the start line; then ``udp``, ``tcp`` and ``api`` say where it listens."""
        deadline = time.monotonic() + timeout
        while (found := _STARTED.search(self.stderr())) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(
                    f"vspan analyze did not start (exit {self.proc.poll()}):\n{self.stderr()}"
                )
            time.sleep(0.05)
        for part in found["where"].split(", "):
            kind, _, address = part.partition(" ")
            host, _, port = address.rpartition(":")
            if kind in ("udp", "tcp"):
                setattr(self, kind, (host, int(port)))
        self.api = found["api"].rstrip("/")
        return self

    def get(self, path: str) -> str:
        """``GET`` ``path`` of the API (from this process's network namespace)."""
        with urllib.request.urlopen(self.api + path, timeout=10) as response:
            return str(response.read().decode())

    def stop(self, timeout: float = 60.0) -> Summary:
        """SIGTERM (flows finished and written), the exit status 0, the exit line."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"vspan analyze ignored SIGTERM:\n{self.stderr()}") from None
        finally:
            self._log.close()
        assert code == 0, f"vspan analyze exited with {code}:\n{self.stderr()}"
        found = list(_STOPPED.finditer(self.stderr()))
        assert found, f"no exit line from vspan analyze:\n{self.stderr()}"
        return Summary(found[-1])

    def kill(self) -> None:
        """SIGKILL: nothing is flushed, nothing closed."""
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._log.close()
