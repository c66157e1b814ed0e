"""mnist-sweep: Optuna sweeps of the MNIST lecture's fully connected network, tracked in MLflow."""

__version__ = "0.1.0"
