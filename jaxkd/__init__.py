"""jaxkd: knowledge distillation for JAX and Flax."""

import importlib.metadata

from jaxkd import losses as losses

try:
  __version__ = importlib.metadata.version("jaxkd")
except importlib.metadata.PackageNotFoundError:  # Imported from a source tree.
  __version__ = "0.0.0+unknown"
