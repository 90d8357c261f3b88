"""advface.metrics."""
