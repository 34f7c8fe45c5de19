"""Benchmarks for collafuse-flwr: run them from the repository root as `python -m benchmarks.<name>`.

- sweep: every method at one budget (CollaFuse over cut ratios, FedAvg, local-only, centralized),
  resumable, followed by `report` (CSV, Markdown table, plots).
- scaling: wall time and peak memory at 10 / 30 / 100 virtual clients.
- infer_time: client inference time at c = 0.2 vs FedAvg's full chain.
- main_job: the default `collafuse-run` command, timed end to end.

See benchmarks/README.md for what each measures and its target.
"""
