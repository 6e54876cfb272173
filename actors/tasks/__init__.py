"""Prompt sources with checkable answers (the project's own generated tasks; no third-party data)."""
