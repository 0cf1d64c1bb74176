"""Load-testing a deployment of the service: `python -m benchmarks.loadtest --host URL ...` (see command.py)."""
