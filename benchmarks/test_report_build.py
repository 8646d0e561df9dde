"""How long the HTML report takes for 10,000 records (issue: seconds, not minutes)."""

import copy
import json

import pytest

from harness.report import data as report_data
from harness.report.html import build

REFERENCE = "results/reference/h200-sdnext-dit-xs.jsonl"


def ten_thousand_records(tmp_path, rootdir) -> list:
    seed = [json.loads(line) for line in (rootdir / REFERENCE).read_text().splitlines()]
    out = []
    night = 0
    while len(out) < 10_000:  # the H200's records, as 10 machines x many nights
        for r in seed:
            r = copy.deepcopy(r)
            r["run"] = f"night{night:03d}"
            r["env"]["host"] = f"runner{night % 10}"
            out.append(r)
        night += 1
    path = tmp_path / "10k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out[:10_000]))
    return path


@pytest.mark.benchmark(group="report")
def test_report_for_10000_records(benchmark, tmp_path, request):
    path = ten_thousand_records(tmp_path, request.config.rootpath)

    def run():
        return build(report_data.load([path]), tmp_path / "site")

    index = benchmark.pedantic(run, rounds=1, iterations=1)
    assert index.exists()
    assert len(report_data.load([path]).frame) == 10_000
