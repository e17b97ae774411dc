"""aptos-ray: diabetic-retinopathy grading from fundus photographs on Ray."""

__version__ = "0.1.0"
