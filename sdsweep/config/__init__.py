"""The configuration: the schema every YAML group is merged into, and its validation."""
