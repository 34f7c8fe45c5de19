"""Benchmarks for collafuse-flwr (`python -m benchmarks.<name>` from the repository root): sweep
and report, client_compute, scaling, deploy_overhead. benchmarks/README.md: each one's question and target."""
