"""Network building blocks shared by every agent: encoders (Nature CNN, MLP) and Q heads."""
from rlq.nets.encoders import MLPEncoder, NatureCNN, make_encoder
from rlq.nets.heads import DuelingHead, QHead, QNetwork

__all__ = ["MLPEncoder", "NatureCNN", "make_encoder", "QHead", "DuelingHead", "QNetwork"]
