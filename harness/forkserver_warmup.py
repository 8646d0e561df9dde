"""Imported once by the cell runner's forkserver so each forked cell does not import these again.

Only imports: no tensor is computed here, so no thread pool or accelerator context exists before the fork.
torch imports several modules lazily on the first use of some ops (sympy through torch.fx's symbolic shapes, on the
first `Module.to_empty`, 0.4 s) and torch._dynamo (through accelerate's hooked forward, 1.6 s), which every
fresh process would pay again and which would inflate the peak RSS of the cells that trigger them.
"""

import accelerate  # noqa: F401  (offload hooks)
import accelerate.hooks  # noqa: F401
import safetensors.torch  # noqa: F401  (checkpoints, references)
import torch._dynamo  # noqa: F401  (accelerate's hooks import it on the first hooked forward)
import torch._refs  # noqa: F401
import torch.fx.experimental.symbolic_shapes  # noqa: F401

import harness.execute  # noqa: F401
import harness.offload  # noqa: F401
