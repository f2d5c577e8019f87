"""``GET /api/v1/policies``: the port-profiles the analyzer enforces, rule by rule."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from vspan.analysis.policy.acl import format_rule
from vspan.api.routers import PREFIX
from vspan.api.views_deps import SourceDep

__all__ = ["router"]

router = APIRouter(prefix=PREFIX, tags=["policies"])


class RuleOut(BaseModel):
    """One ACL rule of a profile, in the NX-OS-like one-line form."""

    rule: str = Field(description="profile#index, as in hits and verdicts")
    index: int
    text: str
    action: str
    name: str | None = None


class ProfileOut(BaseModel):
    """A port-profile: ordered rules, a default, and the VMs it binds."""

    name: str
    description: str
    default: str
    rules: list[RuleOut]
    vms: list[str] = Field(description="names, UUIDs or patterns in the file")


class PoliciesOut(BaseModel):
    """``GET /api/v1/policies``."""

    profiles: list[ProfileOut]


@router.get("/policies")
def list_policies(source: SourceDep) -> PoliciesOut:
    """The loaded port-profiles (empty when the analyzer runs without ``--profiles``)."""
    policy = source.policy
    if policy is None:
        return PoliciesOut(profiles=[])
    return PoliciesOut(
        profiles=[
            ProfileOut(
                name=p.name,
                description=p.description,
                default=str(p.default),
                vms=list(p.vms),
                rules=[
                    RuleOut(
                        rule=f"{p.name}#{i}",
                        index=i,
                        text=format_rule(r),
                        action=str(r.action),
                        name=r.name,
                    )
                    for i, r in enumerate(p.rules, start=1)
                ],
            )
            for p in policy.profiles
        ]
    )
