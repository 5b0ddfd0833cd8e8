"""Jobs that cross stages: what one CLI command runs (calib.cli calls them; they call methods, evaluate, report, store)."""
