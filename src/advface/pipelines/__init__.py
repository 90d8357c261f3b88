"""advface.pipelines."""
