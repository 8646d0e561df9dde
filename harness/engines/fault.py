"""A test-only engine whose "quantization" is a fault, to prove the runner contains each kind of failure.

Not a mock of a real engine: it stands for the native crashes, hangs and leaks real engines have, which cannot be
summoned on demand. Hidden from a matrix's "*"; used by the harness's own tests.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading

import torch
from torch import nn

from harness.engines.base import Engine


class FaultEngine(Engine):
    name = "fault"

    def import_package(self) -> None:
        """With QUANTMATRIX_FAULT_IMPORT_THREAD set, leaves a thread running, as some packages' imports do: the
        cell server must then refuse to fork cells (run/isolation.py)."""
        if os.environ.get("QUANTMATRIX_FAULT_IMPORT_THREAD"):
            threading.Thread(target=threading.Event().wait, name="fault-import-thread", daemon=True).start()

    def quantize(self, model: nn.Module, qtype: str, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
        if qtype == "abort":
            os.abort()
        if qtype == "segfault":
            ctypes.string_at(0)
        if qtype == "hang":  # a deadlock: asleep on a lock nobody will release, no CPU used
            lock = threading.Lock()
            lock.acquire()
            lock.acquire()
        if qtype == "spin":  # a slow cell: computing until the timeout
            while True:
                sum(range(10_000))
        if qtype == "oom":
            hoard = []
            while True:
                hoard.append(bytearray(64 << 20))
                hoard[-1][::4096] = b"x" * len(hoard[-1][::4096])  # touch every page
        if qtype == "exit":
            sys.exit(3)
        if qtype == "raise":
            raise ValueError("fault engine: a plain exception from the engine")
        if qtype == "flood":
            chunk = "x" * 1023 + "\n"
            for _ in range(8 * 1024):  # 8 MiB
                sys.stdout.write(chunk)
            sys.stdout.flush()
            return model
        if qtype == "nan":  # a numeric blow-up: every weight NaN
            with torch.no_grad():
                for p in model.parameters():
                    if p.is_floating_point():
                        p.fill_(float("nan"))
            return model
        if qtype == "noise":  # weights silently replaced: random, of the same shape and scale (std) as each one
            gen = torch.Generator().manual_seed(1234)
            with torch.no_grad():
                for p in model.parameters():
                    if p.is_floating_point() and p.dim() >= 2:
                        p.copy_(torch.randn(p.shape, generator=gen) * p.float().std())
            return model
        if qtype == "slow":  # a real slowdown: each forward computed QUANTMATRIX_FAULT_SLOWDOWN times (default 1)
            times, forward = max(1, int(os.environ.get("QUANTMATRIX_FAULT_SLOWDOWN", "1"))), model.forward

            def slowed(*args, **kwargs):
                for _ in range(times - 1):
                    forward(*args, **kwargs)
                return forward(*args, **kwargs)

            model.forward = slowed
            return model
        if qtype == "orphan":
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=False)
            print(f"fault engine: orphan child pid {child.pid}", flush=True)  # in the record's output tail
            return model
        raise AssertionError(f"unknown fault {qtype}")



