"""Pathology foundation-model encoders from local weights (registry, build, weights)."""

from histoduo.models.encoders.build import (
    Encoder,
    EncoderSummary,
    build_encoder,
    count_parameters,
    create_trunk,
    resolve_encoder,
    summarize_encoders,
)
from histoduo.models.encoders.registry import (
    POOLINGS,
    TIMM_PREFIX,
    EncoderError,
    EncoderSpec,
    get_encoder_spec,
    register_encoder,
    registered_encoders,
    unregister_encoder,
)
from histoduo.models.encoders.weights import (
    FitReport,
    fit_state_dict,
    read_tensors,
    resolve_weights_file,
    sha256_file,
)

__all__ = [
    "POOLINGS",
    "TIMM_PREFIX",
    "Encoder",
    "EncoderError",
    "EncoderSpec",
    "EncoderSummary",
    "FitReport",
    "build_encoder",
    "count_parameters",
    "create_trunk",
    "fit_state_dict",
    "get_encoder_spec",
    "read_tensors",
    "register_encoder",
    "registered_encoders",
    "resolve_encoder",
    "resolve_weights_file",
    "sha256_file",
    "summarize_encoders",
    "unregister_encoder",
]
