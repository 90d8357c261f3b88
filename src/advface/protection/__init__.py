"""advface.protection."""
