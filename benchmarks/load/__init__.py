"""The load benchmark (`python -m benchmarks.load`): N light edges upload one increment each in ONE round."""
