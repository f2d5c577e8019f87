"""``GET /api/v1/policies`` over real HTTP: the loaded port-profiles, rule by rule."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from vspan.analysis.policy.profiles import load_policy
from vspan_testing.served import Served, serve_views

PROFILES = Path(__file__).resolve().parents[2] / "docs" / "examples" / "profiles.yaml"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve_views(tmp_path_factory.mktemp("profiles")) as served:
        yield served


def test_the_loaded_profiles_are_listed_rule_by_rule(served: Served) -> None:
    assert served.get("/api/v1/policies") == {"profiles": []}  # none loaded yet
    served.source.policy = load_policy(str(PROFILES))
    listed = served.get("/api/v1/policies")["profiles"]
    # Independently: the file as plain YAML.
    raw = yaml.safe_load(PROFILES.read_text())
    profiles = raw["profiles"] if isinstance(raw, dict) else raw
    assert [p["name"] for p in listed] == [p["name"] for p in profiles]
    for got, want in zip(listed, profiles, strict=True):
        assert len(got["rules"]) == len(want.get("rules", []))
        assert got["default"] == want.get("default", "deny")
        assert [r["rule"] for r in got["rules"]] == [
            f"{want['name']}#{i}" for i in range(1, len(got["rules"]) + 1)
        ]
        assert all(r["text"].split()[0] in ("permit", "deny") for r in got["rules"])
