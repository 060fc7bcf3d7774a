"""SLAP: Stratified Loss-based Pruning for instruction tuning, on Ray."""

__version__ = "0.1.0"
