"""docs/DEPLOY.md for operators (issue 14 item 6): its sizing figures are PERFORMANCE.md's, its
tokens arithmetic holds for the configured default, and every variable it names is in its table."""
from __future__ import annotations

import re

from conftest import ROOT
from webapp.settings import REGISTRY

DEPLOY = (ROOT / "docs" / "DEPLOY.md").read_text()
PERFORMANCE = (ROOT / "docs" / "PERFORMANCE.md").read_text()
NOT_VARIABLES = {"PASS", "FAIL", "RESULT", "HEALTHCHECK"}


def section(title: str) -> str:
    start = DEPLOY.index(f"## {title}")
    end = DEPLOY.find("\n## ", start + 3)
    return DEPLOY[start:end if end > 0 else None]


def test_every_variable_named_is_in_the_table():
    table = section("Every variable this page uses")
    listed = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", table))
    named = set(re.findall(r"`([A-Z][A-Z0-9]*_[A-Z0-9_]+|PORT)[`=]", DEPLOY))
    named |= set(re.findall(r"-e ([A-Z][A-Z0-9_]+)=", DEPLOY)) | set(re.findall(r"\$\{?([A-Z][A-Z0-9_]+)", DEPLOY))
    named |= set(re.findall(r"\b([A-Z][A-Z0-9]*_[A-Z0-9_]+)=", DEPLOY))
    missing = named - listed - NOT_VARIABLES
    assert not missing, f"named in DEPLOY.md but not in its variables table: {sorted(missing)}"
    service = {s.name for s in REGISTRY}
    for row in re.findall(r"^\| `([A-Z_]+)` \| service \|", table, re.M):
        assert row in service, f"{row} is called a service setting but the registry has no such variable"


def test_the_sizing_figures_are_performance_mds():
    sizing = section("Sizing")
    assert "diffusers engine" in sizing and "acestep engine" in sizing  # which engine measured, which one runs
    for figure in re.findall(r"\b(\d{1,2},\d{3}) MiB", sizing):
        if figure in ("15,360",):
            continue
        assert f"{figure}" in PERFORMANCE, f"{figure} MiB is not a figure of docs/PERFORMANCE.md"
    assert "5.49 GiB" in sizing and "5.49 GiB" in PERFORMANCE


def test_the_tokens_arithmetic_holds_for_the_default():
    default = int(next(s for s in REGISTRY if s.name == "QUEUE_TOKENS").default)
    mib_per_token = 15_360 / 13_000
    table = section("Sizing")
    assert f"| {default:,} (the default) | about {round(default * mib_per_token):,} |" in table
    # float32, offload on, batch 1: the T4 table's row in PERFORMANCE.md, where the measured peak lives.
    retry_peak = int(re.search(r"^\| float32 \| on \| 1 \| ([\d,]+) MiB \|", PERFORMANCE, re.M).group(1).replace(",", ""))
    needed = round(retry_peak / mib_per_token)
    assert f"| {needed:,} | about {retry_peak:,} |" in table and f"QUEUE_TOKENS={needed}" in table
    covers_retry = default * mib_per_token >= retry_peak
    assert ("**not** the float32 retry" in table) == (not covers_retry)


def test_run_and_compose_are_alternatives():
    assert "are **alternatives**" in section("Run") and "The alternative to `docker run`" in section("Compose")
