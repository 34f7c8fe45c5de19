"""CollaFuse on Flower: collaborative diffusion split by timestep, with FedAvg and local-only baselines."""

__version__ = "0.1.0"
