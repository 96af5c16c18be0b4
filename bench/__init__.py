"""Sluiceway's benchmark suite: ``python -m bench [--quick]`` writes bench/RESULTS.md."""
