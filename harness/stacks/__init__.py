"""The stacks: whose code loads, quantizes and offloads a cell (catalog.py: what each offers, as data; one
module per stack; registry.py: their instances)."""
