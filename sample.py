"""Generate videos from prompts. Not yet: the sampler lands with issue 5 (see the README)."""

import sys

if __name__ == "__main__":
    sys.exit("sample.py: not yet. The model is built (jaxdit.VideoDiT); sampling lands with issue 5.")
