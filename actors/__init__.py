"""troupe's Ray actors and the math each role owns (generator, reward, learner).

Nothing in this package imports `cluster`: dependencies point cluster -> actors.
"""
