"""Workloads: the demo served by ``nalar up``, reference workloads, load generators and benchmarks."""
