"""``vspan predict forecast|whatif|place``: traffic forecasts, migration what-if and
placement advice over the flows of an analyzer's store. The inputs are built by
``analysis.predict_views``, as for the API."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from vspan.errors import ConfigError

if TYPE_CHECKING:  # pandas is imported when the command runs, not when the CLI is built
    import pandas as pd

    from vspan.analysis.predict.views import Placement

__all__ = ["add_parser", "run"]

_FORMATS = ("table", "csv", "json")


def add_parser(sub: Any) -> None:
    """Register ``predict`` on the top-level subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "predict",
        help="forecast host traffic, predict a migration's effect, advise placement",
        description="Build traffic matrices from the stored flows; forecast host pairs and "
        "uplinks, show what planned moves change, or advise moves that cut cross-host traffic.",
    )
    p.add_argument("action", choices=("forecast", "whatif", "place"))
    p.add_argument("--data-dir", required=True, metavar="DIR", help="the analyzer's data dir")
    p.add_argument("--inventory", metavar="FILE", help="inventory YAML (VM → host placement)")
    p.add_argument("--bin", type=float, default=3600.0, metavar="S", help="bin width (3600)")
    p.add_argument("--horizon", type=int, default=24, metavar="K", help="bins to forecast (24)")
    p.add_argument("--backtest", action="store_true", help="forecast: score a backtest instead")
    p.add_argument(
        "--recent", type=int, default=24, metavar="N", help="whatif/place: mean of the last N bins"
    )
    p.add_argument("--move", action="append", default=[], metavar="VM=HOST", help="whatif move")
    p.add_argument("--profiles", metavar="FILE", help="whatif: port-profiles YAML")
    p.add_argument("--max-vms-per-host", type=int, metavar="N", help="place: capacity")
    p.add_argument("--pin", action="append", default=[], metavar="VM", help="place: never move")
    p.add_argument(
        "--anti-affinity", action="append", default=[], metavar="A,B", help="place: apart"
    )
    p.add_argument("--max-moves", type=int, default=10, metavar="N", help="place: at most N")
    p.add_argument("--format", choices=_FORMATS, default="table", help="output format")
    p.set_defaults(run=run)


def _flows(data_dir: str) -> pd.DataFrame:
    from vspan.analysis.store.store import Store

    with Store(data_dir, read_only=True) as store:
        return store.query_flows(limit=None)


def _emit(sections: dict[str, pd.DataFrame], fmt: str) -> None:
    from vspan.analysis.records.render import render

    if fmt == "json" and len(sections) > 1:
        body = ",".join(f'"{k}":{v.to_json(orient="records")}' for k, v in sections.items())
        sys.stdout.write("{" + body + "}\n")
        sys.stdout.flush()
        return
    for i, (name, frame) in enumerate(sections.items()):
        if len(sections) > 1:
            sys.stdout.write(("\n" if i else "") + f"# {name}\n")
            sys.stdout.flush()
        render(frame, fmt)


def _placement(args: argparse.Namespace, flows: pd.DataFrame) -> Placement:
    from vspan.analysis.predict.views import placement_of
    from vspan.inventory import Inventory

    if not args.inventory:
        return placement_of(flows)
    inventory = Inventory.load(args.inventory)
    return placement_of(flows, vms=inventory.vms, hosts=inventory.hosts)


def _forecast(args: argparse.Namespace, flows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    from vspan.analysis.predict.forecast import backtest
    from vspan.analysis.predict.views import forecast, series

    if args.backtest:
        measured = series(flows, bin_s=args.bin)
        return {"backtest": backtest(measured, horizon=args.horizon).scores}
    out = forecast(flows, bin_s=args.bin, horizon=args.horizon).forecast
    import pandas as pd

    out.insert(2, "time", pd.to_datetime(out["bin_ns"], unit="ns", utc=True))
    return {"forecast": out.drop(columns="bin_ns")}


def _whatif(args: argparse.Namespace, flows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    from vspan.analysis.predict.views import predict_moves
    from vspan.analysis.predict.whatif import parse_move, rules_with_new_peers

    if not args.move:
        raise ValueError("whatif needs at least one --move VM=HOST")
    moves = [parse_move(m) for m in args.move]
    placement = _placement(args, flows)
    result = predict_moves(flows, placement, moves, bin_s=args.bin, recent=args.recent)
    sections = {
        "host pairs": result.host_pairs,
        "uplinks": result.uplinks,
        "vm pairs": result.vm_pairs,
    }
    if args.profiles:
        from vspan.analysis.policy.evaluate import compile_policy
        from vspan.analysis.policy.profiles import load_policy
        from vspan.inventory import Inventory

        inventory = Inventory.load(args.inventory) if args.inventory else None
        compiled = compile_policy(load_policy(args.profiles), inventory)
        sections["rules with new peers"] = rules_with_new_peers(
            flows, compiled, placement.vms, moves
        )
    return sections


def _place(args: argparse.Namespace, flows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    from vspan.analysis.predict.placement import Constraints
    from vspan.analysis.predict.views import advise_moves

    constraints = Constraints(
        max_vms_per_host=args.max_vms_per_host,
        pinned=frozenset(args.pin),
        anti_affinity=tuple(frozenset(g.split(",")) for g in args.anti_affinity),
    )
    moves = advise_moves(
        flows, _placement(args, flows), constraints, bin_s=args.bin, recent=args.recent,
        max_moves=args.max_moves,
    )  # fmt: skip
    return {"moves": moves}


_ACTIONS = {"forecast": _forecast, "whatif": _whatif, "place": _place}


def run(args: argparse.Namespace) -> int:
    """Run ``vspan predict``."""
    flows = _flows(args.data_dir)
    if flows.empty:
        print("vspan predict: the store holds no flows", file=sys.stderr)
        return 1
    try:
        sections = _ACTIONS[args.action](args, flows)
    except (ValueError, ConfigError) as exc:
        print(f"vspan predict {args.action}: error: {exc}", file=sys.stderr)
        return 2
    _emit(sections, args.format)
    return 0
