"""hollownet: on-device personalization of Stable Diffusion with Hollowed Net."""

__version__ = "0.1.0"
