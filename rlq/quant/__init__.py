"""Quantization-aware training and post-training quantization for any agent network.

>>> from rlq.quant import QuantConfig, quantize_, set_quant_enabled, calibrate, equalize_, bias_correct
>>> quantize_(net, QuantConfig(name="w4a8", weight_bits=4), example_inputs=obs)   # in place
>>> set_quant_enabled(net)            # QAT: train as usual from here

Or post-training quantization of a trained float network::

>>> equalize_(net, replay_obs)        # optional, on the float net: function-preserving cross-layer scaling
>>> quantize_(net, QuantConfig(name="w8a8"), example_inputs=obs)
>>> calibrate(net, replay_obs)        # activation ranges from replay observations
>>> bias_correct(net, replay_obs)     # optional: remove the systematic part of the quantization error

See ``rlq/quant/quantizers.py`` for the quantizer formulas and ``rlq/quant/api.py`` for the rule for
online and target networks.
"""
from rlq.quant.api import (CALIBRATION_METHODS, IntegerLayer, QuantConfig, bias_correct, calibrate, copy_quant_state,
                           equalize_, integer_layer, is_quantized, layer_roles, quant_layers, quantize_,
                           set_quant_enabled)
from rlq.quant.functions import fake_quant, lsq_quant, pact_quant, trust_quant
from rlq.quant.layers import QuantConv2d, QuantLinear, QuantNoisyLinear, QuantSequential
from rlq.quant.quantizers import ActQuantizer, WeightQuantizer

__all__ = ["QuantConfig", "quantize_", "copy_quant_state", "set_quant_enabled", "is_quantized", "calibrate",
           "bias_correct", "equalize_", "quant_layers", "layer_roles", "integer_layer", "IntegerLayer",
           "CALIBRATION_METHODS", "fake_quant", "lsq_quant", "pact_quant", "trust_quant", "QuantLinear", "QuantConv2d",
           "QuantNoisyLinear", "QuantSequential", "ActQuantizer", "WeightQuantizer"]
