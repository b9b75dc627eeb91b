"""Sharded training: the grain input pipeline, the jitted train step, the optimizer and the loop."""
