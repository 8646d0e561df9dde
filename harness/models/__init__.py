"""The built-in models: `specs` (names and shapes, no torch) and `imitation` (DiT/UNet/pipeline modules)."""
