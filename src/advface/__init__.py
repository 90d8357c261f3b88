"""advface: privacy-preserving adversarial facial features (Wang et al., CVPR 2023)."""

__version__ = "0.1.0"
