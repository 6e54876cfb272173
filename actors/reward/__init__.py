"""The reward side: objectives (rules now; learned heads later), aggregations, and the `RewardShard` actor."""
