"""Tokenizers, the shared encoder, the masked-autoencoder pretext task and heads."""

from hfmi_kit.models.backbone import Backbone, layer_id
from hfmi_kit.models.config import SIZES, EncoderConfig, get_size
from hfmi_kit.models.encoder import Encoder
from hfmi_kit.models.heads import DenseHead, PooledHead, SequenceHead
from hfmi_kit.models.mae import (
    MAEDecoder,
    MaskedAutoencoder,
    mae_forward,
    make_decoder,
    mask_scores,
    masked_mse,
)
from hfmi_kit.models.registry import create_model, list_models, register_model
from hfmi_kit.models.tokenizers import (
    GridTokenizer,
    SetTokenizer,
    TokenBatch,
    patchify,
    unpatchify,
)

__all__ = [
    "SIZES",
    "Backbone",
    "DenseHead",
    "Encoder",
    "EncoderConfig",
    "GridTokenizer",
    "MAEDecoder",
    "MaskedAutoencoder",
    "PooledHead",
    "SequenceHead",
    "SetTokenizer",
    "TokenBatch",
    "create_model",
    "get_size",
    "layer_id",
    "list_models",
    "mae_forward",
    "make_decoder",
    "mask_scores",
    "masked_mse",
    "patchify",
    "register_model",
    "unpatchify",
]
