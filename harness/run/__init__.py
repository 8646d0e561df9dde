"""Running cells: the pytest plugin, the cell server and process isolation, executing and measuring one cell."""
