"""Converters from other projects' checkpoints to jaxdit's formats (run as `python -m jaxdit.convert.<name>`)."""
