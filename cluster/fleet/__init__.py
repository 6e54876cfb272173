"""Fleets and placement: pools of actors per role, resizing, placement, the learner groups and the reward model's shard pools."""
