"""m6-engine: a Megatron-style training engine for M6 (multimodal image + Chinese text).

Importing the package never needs the compiled extension; the fused ops say how to build it when
it is missing (see ``m6_engine.ops``).
"""

__version__ = "0.1.0"
