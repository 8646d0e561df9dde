"""The engines: `catalog` (names, types, load modes; no torch), `base` (the interface), one module per engine,
`registry` (the instances), `containers` (bounded checks of model files before any library reads them).
"""
