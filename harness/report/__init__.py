"""Reports from result records only: tables, HTML, plots, markdown, compare. Imports neither torch nor an engine
nor the runner (tests/test_layering.py).
"""
