"""advface.service."""
