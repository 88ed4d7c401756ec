"""Train a VideoDiT. Not yet: the training loop lands with issue 4 (see the README)."""

import sys

if __name__ == "__main__":
    sys.exit("train.py: not yet. The model is built (jaxdit.VideoDiT); training lands with issue 4.")
