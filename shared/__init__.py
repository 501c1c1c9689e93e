"""Code both sides of fedscdd use: data contract, models, distillation, evaluation."""

__version__ = "0.1.0"
