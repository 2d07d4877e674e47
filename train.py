"""Train a denoiser from a clone: `python train.py [flags]` is the same as `diffunet train [flags]`.

With no flags it trains the default small U-Net on the MNIST subset shipped in the package and
writes sample grids to runs/default/. `python train.py --help` lists every flag.
"""
import sys

from diffunet.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
