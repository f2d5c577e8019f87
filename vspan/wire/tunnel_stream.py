"""Sequences of tunnel messages: the TCP stream decoder and the sender's message builder.

Both are sans-I/O, like ``vspan.wire.tunnel``. ``StreamDecoder`` is feed-and-pull (h11 style):
the receiver feeds whatever bytes the socket gave and pulls messages until ``NEED_DATA``,
then calls ``end_of_stream()`` at EOF. What a decoder holds is bounded before any tag is
checked: a header announcing more than ``max_message`` bytes (by default 65,535, what a
UDP datagram can carry) is rejected as soon as its 24 bytes are in, so a receiver that feeds
at most N bytes at a time and pulls every message holds less than ``max_message + N``.
``MessageBuilder`` packs frames into messages no
larger than ``max_message`` and hands each one back when it is full.
"""

from __future__ import annotations

import enum
from collections.abc import Container, Mapping
from typing import Final

from vspan.errors import TunnelError
from vspan.wire.tunnel import (
    AUTH_LEN,
    HEADER_LEN,
    MAGIC,
    MIN_FRAME,
    RECORD_LEN,
    VERSION,
    VNTAG_ETHERTYPE,
    Message,
    decode_message,
    encode_message,
    parse_header,
)

__all__ = ["MAX_STREAM_MESSAGE", "NEED_DATA", "MessageBuilder", "NeedData", "StreamDecoder"]

MAX_STREAM_MESSAGE: Final = 65535
"""The default largest message a stream may carry: what a UDP datagram can."""
_SEQ_MOD: Final = 1 << 32
_VNTAG_BYTES: Final = VNTAG_ETHERTYPE.to_bytes(2, "big")
_MAX_KEY: Final = 64  # hashlib.blake2b accepts keys of at most 64 bytes


class NeedData(enum.Enum):
    """What ``StreamDecoder.next_message`` returns when no whole message is buffered."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


def _check_key(key: bytes, what: str) -> None:
    if len(key) > _MAX_KEY:
        raise ValueError(f"{what}: key of {len(key)} bytes, BLAKE2b takes at most {_MAX_KEY}")


class StreamDecoder:
    """Split a TCP byte stream into validated messages.

    ``feed(data)`` appends bytes; ``next_message()`` returns the next ``Message`` or
    ``NEED_DATA`` (``next_raw()`` the same message's bytes instead). ``registered`` names
    collectors that ``require_known`` accepts without a key (registered through the control
    plane; any container, so it may change while the stream lasts). The header checks of
    ``parse_header`` (and ``length > max_message``, a ``bad_length``) run as soon as 24
    bytes of a message are buffered, so garbage is rejected without waiting for
    ``length`` bytes; the rest of ``decode_message``'s checks
    run once the whole message is there. After a ``TunnelError`` the decoder is broken:
    every later call raises that same error, and the receiver closes the stream.
    """

    def __init__(
        self,
        *,
        keys: Mapping[int, bytes] | None = None,
        require_known: bool = False,
        registered: Container[int] = (),
        max_message: int = MAX_STREAM_MESSAGE,
    ) -> None:
        if max_message < HEADER_LEN:
            raise ValueError(f"max_message {max_message} is below the {HEADER_LEN}-byte header")
        for collector, key in (keys or {}).items():
            _check_key(key, f"collector_id {collector}")
        self._keys = keys
        self._require_known = require_known
        self._registered = registered
        self._max_message = max_message
        self._buf = bytearray()
        self._pos = 0
        self._length: int | None = None  # the current message's length, once its header passed
        self._known_here = require_known  # whether require_known applied to its collector
        self._error: TunnelError | None = None
        self._ended = False

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet returned as a message."""
        return len(self._buf) - self._pos

    @property
    def current_collector(self) -> int:
        """``collector_id`` in the header of the message being decoded (the one a
        ``TunnelError`` was about) when its magic and version are right, else 0."""
        head = bytes(self._buf[self._pos : self._pos + 12])
        if len(head) < 12 or head[0:3] != MAGIC.to_bytes(2, "big") + bytes([VERSION]):
            return 0
        return int.from_bytes(head[8:12], "big")

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes received from the stream (raises the error once broken)."""
        if self._error is not None:
            raise self._error
        if self._ended:
            raise RuntimeError("feed() after end_of_stream()")
        self._buf += data

    def next_message(self) -> Message | NeedData:
        """The next whole, valid message, or ``NEED_DATA``; raises ``TunnelError``."""
        got = self._pull()
        return got if isinstance(got, NeedData) else got[1]

    def next_raw(self) -> bytes | NeedData:
        """The bytes of the next whole, valid message (validated exactly as by
        ``next_message``), or ``NEED_DATA``; raises ``TunnelError``."""
        got = self._pull()
        return got if isinstance(got, NeedData) else got[0]

    def _pull(self) -> tuple[bytes, Message] | NeedData:
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except TunnelError as exc:
            self._error = exc
            raise

    def end_of_stream(self) -> None:
        """The peer closed the stream: raises ``bad_length`` if a partial message is left."""
        if self._error is not None:
            raise self._error
        self._ended = True
        if self.buffered:
            expected = f"{self._length}" if self._length is not None else "at least 24"
            self._error = TunnelError(
                "bad_length",
                f"stream ended inside a message: {self.buffered} bytes buffered, "
                f"message needs {expected}",
            )
            raise self._error

    def _known_only(self, head: bytes) -> bool:
        """Whether ``require_known`` applies to this header's collector (not registered)."""
        return self._require_known and int.from_bytes(head[8:12], "big") not in self._registered

    def _next(self) -> tuple[bytes, Message] | NeedData:
        available = self.buffered
        if self._length is None:
            if available < HEADER_LEN:
                return NEED_DATA
            with memoryview(self._buf) as view:
                head = bytes(view[self._pos : self._pos + HEADER_LEN])
            self._known_here = self._known_only(head)
            header = parse_header(head, keys=self._keys, require_known=self._known_here)
            if header.length > self._max_message:
                raise TunnelError(
                    "bad_length",
                    f"header says {header.length} bytes, more than the stream's "
                    f"max_message of {self._max_message}",
                )
            self._length = header.length
        length = self._length
        if available < length:
            return NEED_DATA
        with memoryview(self._buf) as view:
            data = bytes(view[self._pos : self._pos + length])
        # Raises with the message still at _pos (current_collector names its sender).
        message = decode_message(data, keys=self._keys, require_known=self._known_here, stream=True)
        self._pos += length
        self._length = None
        if self._pos * 2 >= len(self._buf):  # compact: amortized linear copying
            del self._buf[: self._pos]
            self._pos = 0
        return data, message


class MessageBuilder:
    """Pack frames into messages of at most ``max_message`` bytes (the sender side).

    ``add`` returns the previous message, finished, when the new frame does not fit beside
    it; ``flush`` finishes the pending one. ``seq`` starts at ``first_seq`` and wraps modulo
    2^32. A frame too large for an empty message is truncated to fit (``cap_len <
    orig_len``), never split; ``truncated`` counts them.
    """

    def __init__(
        self,
        *,
        collector_id: int,
        boot_id: int,
        max_message: int = 1400,
        key: bytes | None = None,
        first_seq: int = 0,
    ) -> None:
        self._tag_len = AUTH_LEN if key is not None else 0
        smallest = HEADER_LEN + RECORD_LEN + MIN_FRAME + self._tag_len
        if max_message < smallest:
            raise ValueError(f"max_message {max_message} below {smallest}, the smallest message")
        if key is not None:
            _check_key(key, "MessageBuilder")
        for name, value, low in (
            ("collector_id", collector_id, 1),
            ("boot_id", boot_id, 0),
            ("first_seq", first_seq, 0),
        ):
            if not low <= value < _SEQ_MOD:
                raise ValueError(f"{name} {value} out of range {low}..{_SEQ_MOD - 1}")
        self._collector_id = collector_id
        self._boot_id = boot_id
        self._max_message = max_message
        self._key = key
        self._frames: list[bytes] = []
        self._ts_ns: list[int] = []
        self._orig_len: list[int] = []
        self._size = 0
        self.next_seq = first_seq
        """The ``seq`` of the next message to be finished."""
        self.truncated = 0
        """Frames truncated to fit one message."""
        self.messages = 0
        """Messages finished so far."""

    @property
    def pending_frames(self) -> int:
        """Frames waiting in the unfinished message."""
        return len(self._frames)

    @property
    def pending_bytes(self) -> int:
        """Size the unfinished message would have if flushed now (0 when empty)."""
        return self._size + HEADER_LEN + self._tag_len if self._frames else 0

    def add(self, frame: bytes, ts_ns: int, orig_len: int | None = None) -> bytes | None:
        """Append one VN-tagged frame; returns the previous message if this one did not fit."""
        orig = len(frame) if orig_len is None else orig_len
        if len(frame) < MIN_FRAME or frame[12:14] != _VNTAG_BYTES:
            raise ValueError(
                f"frame of {len(frame)} bytes is not VN-tagged: need at least {MIN_FRAME} "
                f"bytes and EtherType 0x{VNTAG_ETHERTYPE:04x} at offset 12"
            )
        if not len(frame) <= orig <= 0xFFFF:
            raise ValueError(f"orig_len {orig} out of range {len(frame)}..65535")
        if not -(1 << 63) <= ts_ns < 1 << 63:
            raise ValueError(f"ts_ns {ts_ns} does not fit in int64")
        done = None
        if self._frames and self.pending_bytes + RECORD_LEN + len(frame) > self._max_message:
            done = self.flush()
        room = self._max_message - HEADER_LEN - self._tag_len - RECORD_LEN
        if len(frame) > room:
            frame = frame[:room]
            self.truncated += 1
        self._frames.append(frame)
        self._ts_ns.append(ts_ns)
        self._orig_len.append(orig)
        self._size += RECORD_LEN + len(frame)
        return done

    def flush(self) -> bytes | None:
        """Finish the pending message and return it (``None`` when no frame is pending)."""
        if not self._frames:
            return None
        message = encode_message(
            collector_id=self._collector_id,
            boot_id=self._boot_id,
            seq=self.next_seq,
            frames=self._frames,
            ts_ns=self._ts_ns,
            orig_len=self._orig_len,
            key=self._key,
        )
        self.next_seq = (self.next_seq + 1) % _SEQ_MOD
        self.messages += 1
        self._frames, self._ts_ns, self._orig_len, self._size = [], [], [], 0
        return message
