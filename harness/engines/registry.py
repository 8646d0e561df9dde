"""The engine registry: adding an engine means its module, its entry in catalog.py and one line here."""

from __future__ import annotations

from harness.engines.base import Engine
from harness.engines.bnb import BitsAndBytesEngine
from harness.engines.fault import FaultEngine
from harness.engines.gguf_engine import GGUFEngine
from harness.engines.nncf_engine import NNCFEngine
from harness.engines.none import NoneEngine
from harness.engines.quanto import QuantoEngine
from harness.engines.sdnq import SDNQEngine
from harness.engines.torchao_engine import TorchAOEngine

ENGINES: dict[str, Engine] = {e.name: e for e in (
    NoneEngine(), BitsAndBytesEngine(), QuantoEngine(), GGUFEngine(), NNCFEngine(), SDNQEngine(), TorchAOEngine(),
    FaultEngine(),
)}
