"""advface.models."""
