"""The Grafana dashboard's PromQL, with Grafana's variables expanded, for checks and end-to-end runs.

`dashboard_queries()` gives every panel query of deploy/grafana/dashboards/vigie.json as plain
PromQL: `$__rate_interval` and friends become durations, `$token`/`$instance` become `.*` (what
the "All" option sends), so that each can be checked with promtool or run against a real
Prometheus scraping the agent.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

from .util import REPO_ROOT

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "vigie.json"

# What Grafana would substitute, for a query run by hand.
DEFAULT_VARIABLES: dict[str, str] = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "1h",
    "token": ".*",
    "instance": ".*",
}

# $name, ${name} and ${name:format}
_VARIABLE = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\$(\w+)")


class UndefinedVariable(KeyError):
    """A query uses a variable that the dashboard does not define (and Grafana would leave as is)."""


def load_dashboard(path: Path | str = DASHBOARD) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel in display order, rows included, and the panels of collapsed rows after their row."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def expand(expr: str, variables: dict[str, str] | None = None) -> str:
    """`expr` with every Grafana variable replaced; raises UndefinedVariable for an unknown one."""
    values = dict(DEFAULT_VARIABLES)
    values.update(variables or {})

    def substitute(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise UndefinedVariable(f"unknown variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(substitute, expr)


def panel_targets(dashboard: dict[str, Any] | None = None) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every Prometheus query target that has an expression."""
    dashboard = dashboard if dashboard is not None else load_dashboard()
    out = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr", "").strip():
                out.append((panel, target))
    return out


def dashboard_queries(
    variables: dict[str, str] | None = None,
    dashboard: dict[str, Any] | None = None,
) -> list[str]:
    """Every panel query of the dashboard, in panel order, as plain PromQL.

    `variables` overrides DEFAULT_VARIABLES (e.g. {"token": "0123456789abcdef"}).
    """
    return [expand(t["expr"], variables) for _, t in panel_targets(dashboard)]


def variable_queries(dashboard: dict[str, Any] | None = None) -> dict[str, str]:
    """{variable name: its query} for the dashboard's query variables (label_values(...) etc.)."""
    dashboard = dashboard if dashboard is not None else load_dashboard()
    out = {}
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        out[var["name"]] = query or var.get("definition", "")
    return out


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<selector>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*$")


def label_values_selector(query: str) -> tuple[str | None, str]:
    """(series selector or None, label) of a `label_values([selector,] label)` variable query."""
    m = _LABEL_VALUES.match(query)
    if not m:
        raise ValueError(f"not a label_values() query: {query!r}")
    return m.group("selector"), m.group("label")
