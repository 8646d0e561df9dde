"""The engine registry: one instance of each engine the catalog names (its `implementation`). Adding an engine is
its module and its entry in catalog.py; nothing here changes."""

from __future__ import annotations

import importlib

from harness.engines.base import Engine
from harness.engines.catalog import CATALOG


def _instance(where: str) -> Engine:
    module, _, cls = where.partition(":")
    return getattr(importlib.import_module(module), cls)()


ENGINES: dict[str, Engine] = {name: _instance(info.implementation) for name, info in CATALOG.items()}
