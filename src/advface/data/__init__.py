"""advface.data."""
