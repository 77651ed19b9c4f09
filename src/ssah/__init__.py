"""ssah: see, protect and install the safety of a language model at neuron level."""

__version__ = "0.1.0"
