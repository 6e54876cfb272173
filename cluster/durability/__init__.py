"""Durability: checkpoints, resume, recovery from lost ranks, deadlines and retry budgets, and the prompt accounting."""
