"""The lent GPU machine's script plans its phases here too: `scripts/device-matrix.sh plan` lists each phase's
pytest command and the cells pytest collects for it, most valuable first, and runs nothing."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_device_script_plans_its_phases_without_running_a_cell(tmp_path):
    proc = subprocess.run(["bash", "scripts/device-matrix.sh", "plan"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    phases = [line.split(":")[0].removeprefix("== ") for line in proc.stdout.splitlines() if line.startswith("== ")]
    assert phases == ["probe", "flux-none", "flux-none-direct", "flux-model", "sdxl", "flux-offload", "sdnext",
                      "upstream", "gpu-none", "gpu-offload", "gpu-large"]
    counts = {line.split(":")[0][3:]: int(line.split(": ")[1].split()[0].split("/")[0])
              for line in proc.stdout.splitlines() if line.startswith("== ")}
    assert counts["probe"] == 5 and counts["flux-none"] == 15 and all(n > 0 for n in counts.values())
    assert not list(tmp_path.glob("*.jsonl")) and not (tmp_path / "run.log").exists()  # nothing ran


def test_the_wheel_list_is_the_one_the_readme_downloads():
    wheels = [line for line in (REPO / "scripts" / "device-wheels.txt").read_text().splitlines()
              if line and not line.startswith("#")]
    assert "diffusers==0.42.1" in wheels and all("==" in w for w in wheels)
    assert "-r scripts/device-wheels.txt" in (REPO / "docs" / "nightly-and-gpu.md").read_text()


def test_published_claims_are_rules_on_flux_sized_cells_that_a_cpu_reports_unavailable():
    from harness.matrix import load_matrix
    from harness.run.execute import unavailable

    matrix = load_matrix(REPO / "matrices" / "published.toml")
    assert {c.model for c in matrix.cells} == {"flux-dev", "sdxl"} and {c.dtype for c in matrix.cells} == {"bfloat16"}
    assert {c.device for c in matrix.cells} <= {"cuda", "rocm", "xpu"}
    assert all(r.expect.source and r.expect.claims for r in matrix.rules)
    factors = {c for r in matrix.rules for c in r.expect.claims if ":" in c}
    assert {"smaller-by:3.0", "smaller-by:1.5", "less-memory-by:2.5", "slower-by:1.5"} <= factors
    flux_nf4 = next(c for c in matrix.cells if c.id == "bnb-nf4/post-load/none/cuda/flux-dev/bfloat16/diffusers")
    assert "less-memory-by:2.5" in matrix.expectation(flux_nf4).claims
    if not __import__("torch").cuda.is_available():  # this host: reported unavailable (no GPU), not failed
        outcome = unavailable(flux_nf4)
        assert outcome is not None and outcome.status == "unavailable"
