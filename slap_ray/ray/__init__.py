"""Thin Ray adapters: each module wraps one core function for Ray Data, actors, Train or Tune."""
