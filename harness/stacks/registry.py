"""The stack registry: one instance of each stack the catalog names (its `implementation`)."""

from __future__ import annotations

import importlib

from harness.cell import Cell
from harness.stacks.base import Stack
from harness.stacks.catalog import STACK_CATALOG


def _instance(where: str) -> Stack:
    module, _, cls = where.partition(":")
    return getattr(importlib.import_module(module), cls)()


STACKS: dict[str, Stack] = {name: _instance(info.implementation) for name, info in STACK_CATALOG.items()}


def stack_of(cell: Cell) -> Stack:
    return STACKS[cell.stack]
