"""Peer setups the benchmark runs side by side with the service: the same pack, decode and postprocess."""
