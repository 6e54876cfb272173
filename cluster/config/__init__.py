"""The typed config schema and its cross-field checks."""
