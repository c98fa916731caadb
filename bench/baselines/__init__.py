"""Baselines: what a user writes today without MoPE Engine."""
