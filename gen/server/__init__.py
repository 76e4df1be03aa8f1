"""The REST server and its engine: `gen serve` (cli.py), the app (app.py), the queue (engine.py), jobs (jobs.py)."""
