"""diffunet: a small, fast, hackable time-conditioned U-Net for diffusion denoisers."""
from .unet import PRESETS, UNet, UNetConfig

__version__ = "0.1.0"
__all__ = ["UNet", "UNetConfig", "PRESETS", "__version__"]
