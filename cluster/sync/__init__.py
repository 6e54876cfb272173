"""Weight sync from learner rank 0 to the generators: the object store path and the NCCL path."""
