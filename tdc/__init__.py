"""tdc: a compiler for a tensor dataflow DSL."""
__version__ = "0.1.0"
