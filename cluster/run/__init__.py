"""The run loop: the driver, the iterations (generate, score, learn, sync, evaluate), async rollouts, the job skeleton and Ray start-up."""
