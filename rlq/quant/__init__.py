"""Quantization-aware training and post-training quantization for any agent network.

>>> from rlq.quant import QuantConfig, quantize_, set_quant_enabled, calibrate
>>> quantize_(net, QuantConfig(name="w4a8", weight_bits=4), example_inputs=obs)   # in place
>>> set_quant_enabled(net)            # QAT: train as usual from here
>>> calibrate(net, replay_obs)        # or PTQ of a trained float network

See ``rlq/quant/quantizers.py`` for the quantizer formulas and ``rlq/quant/api.py`` for the rule for
online and target networks.
"""
from rlq.quant.api import (CALIBRATION_METHODS, IntegerLayer, QuantConfig, calibrate, copy_quant_state, integer_layer,
                           is_quantized, layer_roles, quant_layers, quantize_, set_quant_enabled)
from rlq.quant.functions import fake_quant, lsq_quant, pact_quant, trust_quant
from rlq.quant.layers import QuantConv2d, QuantLinear, QuantNoisyLinear
from rlq.quant.quantizers import ActQuantizer, WeightQuantizer

__all__ = ["QuantConfig", "quantize_", "copy_quant_state", "set_quant_enabled", "is_quantized", "calibrate", "quant_layers",
           "layer_roles", "integer_layer", "IntegerLayer", "CALIBRATION_METHODS", "fake_quant", "lsq_quant",
           "pact_quant", "trust_quant", "QuantLinear", "QuantConv2d", "QuantNoisyLinear", "ActQuantizer",
           "WeightQuantizer"]
