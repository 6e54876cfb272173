"""The driver side of troupe: config, Ray start-up, actor fleets, weight sync, and the training loop."""
