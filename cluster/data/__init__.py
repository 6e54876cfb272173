"""Readers of user data: prompt sets, preference pairs and per-objective ratings."""
