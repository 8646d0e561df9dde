"""pytest-xdist wiring: every worker writes under the controller's run id into the same results file, and gets a
device and a share of the CPU threads of its own."""

from __future__ import annotations

import json
import os

import pytest

from harness.run.session import IDS_KEY


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """pytest-xdist controller: every worker writes under the same run id into the same results file, and gets a
    device of its own when the host has accelerators (CUDA_VISIBLE_DEVICES, HIP_VISIBLE_DEVICES,
    ZE_AFFINITY_MASK), so that peak-memory figures stay per device."""
    from harness.devices import pin_worker, visible_accelerators

    run_id, results = node.config.stash[IDS_KEY]
    number = int(node.workerinput["workerid"].removeprefix("gw"))
    workers = max(1, len(node.config.getvalue("tx") or []))
    # CPU threads shared out too: two workers of two threads each on two cores would measure contention
    pin = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers)),
           **pin_worker(number, *visible_accelerators())}
    node.workerinput.update(quantmatrix_run=run_id, quantmatrix_results=str(results), quantmatrix_pin=json.dumps(pin))
