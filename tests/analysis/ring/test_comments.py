"""Frame comments read back from pcapng: each frame gets exactly its own."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vspan.analysis.ring import comments as ring_comments
from vspan.analysis.ring.comments import epb_comments
from vspan.batch import FrameBatch, LinkType
from vspan.pcap.read import CaptureReader
from vspan.pcap.write import PcapngWriter


def written(tmp_path: Path, comments: list[str | None], sizes: list[int]) -> FrameBatch:
    """A pcapng of frames of ``sizes`` bytes with ``comments``, read back as one batch."""
    data = np.frombuffer(b"".join(bytes([i % 251]) * n for i, n in enumerate(sizes)), np.uint8)
    lengths = np.array(sizes, np.int32)
    batch = FrameBatch(
        data=data, offset=np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64),
        caplen=lengths, origlen=lengths, ts_ns=np.arange(len(sizes), dtype=np.int64),
        linktype=np.full(len(sizes), LinkType.ETHERNET, np.uint16),
    )  # fmt: skip
    out = io.BytesIO()
    writer = PcapngWriter(out)
    writer.add_interface(name="port")
    writer.write_batch(batch, iface=0, comments=comments)
    path = tmp_path / "c.pcapng"
    path.write_bytes(out.getvalue())
    (back,) = list(CaptureReader(path))
    return back


text = st.one_of(
    st.none(), st.sampled_from(["permit", "deny rule 3", "vm=db-ü"]), st.text(max_size=40)
)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(text, st.integers(14, 90)), min_size=1, max_size=60))
def test_each_frame_reads_back_its_own_comment(
    tmp_path_factory: pytest.TempPathFactory, frames: list[tuple[str | None, int]]
) -> None:
    comments = [c for c, _ in frames]
    back = written(tmp_path_factory.mktemp("c"), comments, [n for _, n in frames])
    assert epb_comments(back) == comments


def test_a_hash_collision_never_hands_a_frame_another_comment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    comments = ["permit", "deny", None, "deny", "permit", "other"]
    back = written(tmp_path, comments, [60] * len(comments))
    spans = ring_comments._spans

    def colliding(*args: object) -> np.ndarray:
        out = spans(*args)
        out[:, 2] = 7  # every comment hashes the same
        return out

    monkeypatch.setattr(ring_comments, "_spans", colliding)
    assert epb_comments(back) == comments
