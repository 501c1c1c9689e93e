"""The run-time library both apps import (in the app bundle): data contract, models, distillation, evaluation, privacy,
protocol."""

__version__ = "0.1.0"
