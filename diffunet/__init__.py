"""diffunet: a small, fast, hackable time-conditioned U-Net for diffusion denoisers."""
from .unet import PRESETS, UNet, UNetConfig

__version__ = "0.1.0"

from .run import Run, load_run  # noqa: E402  (checkpoint.py reads __version__)

__all__ = ["UNet", "UNetConfig", "PRESETS", "Run", "load_run", "__version__"]
