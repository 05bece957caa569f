"""fmjax: train language foundation models through their whole life with one pure-functional JAX train loop."""

__version__ = "0.1.0"
