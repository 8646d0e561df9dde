"""matrices/upstream.toml: every reported incompatibility the project tracks is a rule that cites its report."""

import re
from pathlib import Path

from harness.matrix import load_matrix

UPSTREAM = Path(__file__).parent.parent / "matrices" / "upstream.toml"
REPORTS = ["diffusers#14691", "diffusers#10800", "bitsandbytes#1525", "diffusers#10526", "diffusers#10470",
           "accelerate#4044", "diffusers#12610", "diffusers#13281", "diffusers#14433", "sdnq#11"]


def test_every_tracked_report_is_a_rule():
    sources = " ".join(r.expect.source for r in load_matrix(UPSTREAM, present_devices=("cpu", "cuda")).rules)
    missing = [r for r in REPORTS if not re.search(rf"(?<![\w#]){re.escape(r)}(?!\d)", sources)]
    assert not missing


def test_each_rule_cites_a_report_or_says_it_was_measured_here():
    for rule in load_matrix(UPSTREAM).rules:
        assert re.match(r"[\w.-]+#\d+", rule.expect.source) or rule.expect.source.startswith("measured"), \
            rule.expect.source


def test_a_rule_for_a_shipped_fix_bounds_the_versions_it_holds_for():
    for rule in load_matrix(UPSTREAM).rules:
        if rule.expect.kind == "works":
            assert rule.versions, f"{rule.expect.source}: a fixed report's rule names the versions with the fix"


def test_reports_needing_cuda_are_limited_to_it():
    cuda_only = {"diffusers#10800", "diffusers#12610", "diffusers#13281", "diffusers#14433", "accelerate#4044"}
    for rule in load_matrix(UPSTREAM).rules:
        report = rule.expect.source.split(":")[0].split(" ")[0]
        if report in cuda_only:
            assert rule.match.get("device") == ("cuda",), report
