"""advface.attacks."""
