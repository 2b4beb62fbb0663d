"""Parsing of Prometheus / OpenMetrics text exposition into flat, comparable dicts."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable

from prometheus_client.openmetrics import parser as om_parser
from prometheus_client import parser as prom_parser

SeriesKey = tuple  # (sample name, frozenset of (label, value))


class Metrics(dict):
    """`{(sample_name, frozenset(labels.items())): value}` with a few query helpers.

    Sample names are as exposed (counters keep their `_total` suffix).
    """

    def __init__(self, *args, text: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.text = text

    def names(self) -> set[str]:
        return {name for name, _ in self}

    def series(self, name: str, **match: str) -> list[tuple[dict, float]]:
        """Every series of `name` whose labels include `match`, as (labels, value)."""
        out = []
        for (n, labels), value in self.items():
            if n != name:
                continue
            d = dict(labels)
            if all(d.get(k) == v for k, v in match.items()):
                out.append((d, value))
        return out

    def get_value(self, name: str, default: float | None = None, **labels: str) -> float | None:
        """The value of the series with exactly these labels."""
        return self.get((name, frozenset(labels.items())), default)

    def total(self, name: str, **match: str) -> float:
        """Sum of every series of `name` whose labels include `match`."""
        return sum(v for _, v in self.series(name, **match))

    def sum_by(self, name: str, label: str, **match: str) -> dict[str, float]:
        """`{label value: sum of the matching series of name}` (series without the label are skipped)."""
        out: dict[str, float] = defaultdict(float)
        for labels, value in self.series(name, **match):
            if label in labels:
                out[labels[label]] += value
        return dict(out)

    def sum_by2(self, name: str, label1: str, label2: str, **match: str) -> dict[tuple[str, str], float]:
        """`{(label1 value, label2 value): sum}`."""
        out: dict[tuple[str, str], float] = defaultdict(float)
        for labels, value in self.series(name, **match):
            if label1 in labels and label2 in labels:
                out[(labels[label1], labels[label2])] += value
        return dict(out)


def _flatten(families: Iterable) -> dict:
    out = {}
    for family in families:
        for sample in family.samples:
            value = float(sample.value)
            key = (sample.name, frozenset(sample.labels.items()))
            out[key] = value
    return out


def parse(text: str) -> Metrics:
    """Parse exposition text (OpenMetrics when it ends with `# EOF`, else Prometheus 0.0.4).

    Falls back from the strict OpenMetrics parser to the lenient Prometheus one, so an agent
    whose output is slightly off-spec still gets compared (promtool is the place to lint it).
    """
    errors = []
    parsers = []
    if text.rstrip().endswith("# EOF"):
        parsers.append(("openmetrics", om_parser.text_string_to_metric_families))
    parsers.append(("prometheus", prom_parser.text_string_to_metric_families))
    for kind, fn in parsers:
        try:
            body = text
            if kind == "prometheus":
                body = "\n".join(l for l in text.splitlines() if l.strip() != "# EOF") + "\n"
            return Metrics(_flatten(fn(body)), text=text)
        except Exception as e:  # noqa: BLE001 - report every parser's complaint
            errors.append(f"{kind}: {e!r}")
    raise ValueError("cannot parse metrics exposition: " + "; ".join(errors) + "\n" + text[:2000])


def is_number(v: float | None) -> bool:
    return v is not None and not math.isnan(v)
