"""Observability: per-iteration metrics and the table, where logs go (TensorBoard, W&B, MLflow), and plots."""
