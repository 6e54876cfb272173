"""The learner role: policy-gradient math, batching, and the DeepSpeed `Learner` actor."""
