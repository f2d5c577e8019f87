"""The network-namespace lab as a fixture (see ``vspan_testing.netlab``)."""

from __future__ import annotations

import pytest

from vspan_testing.netlab import Lab, make_lab


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Lab:
    """2 hosts × 3 VMs, deleted by a finalizer whatever the test does; skips unless root."""
    return make_lab(request, "vslab", hosts=2, vms_per_host=3)
