"""The REST server: `gen serve` (cli.py), the app (app.py), its HTTP edge (http.py), the request queue (queue.py),
admission limits (limits.py), video jobs (videos.py) in the job store (jobs.py), output files and retention
(outputs.py), webhooks (webhooks.py) and metrics (metrics.py)."""
