"""quantmatrix: a compatibility-matrix test harness and benchmark suite for model quantization engines."""

__version__ = "0.1.0"
