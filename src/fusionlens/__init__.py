"""fusionlens: explain and prune multi-sensor fusion perception networks."""

__version__ = "0.1.0"
