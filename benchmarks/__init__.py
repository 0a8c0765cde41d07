"""Benchmarks: one script per figure (see README "Performance")."""
