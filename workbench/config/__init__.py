"""The model configuration: `ModelConfig` (a frozen dataclass under DeepSeek's field names, exact config.json round
trips, presets) and the names it is made of. Modules in the order they import each other: `names` (model types,
V4's attention kinds, `ConfigError`), `v4_forms` (V4's transformers and hub config.json forms), `model`
(`ModelConfig`, `PRESETS`)."""

from workbench.config.model import PRESETS, ModelConfig
from workbench.config.names import (
    ARCHITECTURES,
    CSA,
    CSA_RATIO,
    HCA,
    KIND_NAMES,
    SLIDING,
    ConfigError,
    ConfigForm,
    ModelType,
    RopeLayout,
    ScoringFunc,
    TopkMethod,
    rope_type,
    yarn_mscale,
)

__all__ = [
    "ARCHITECTURES", "CSA", "CSA_RATIO", "HCA", "KIND_NAMES", "PRESETS", "SLIDING", "ConfigError", "ConfigForm", "ModelConfig",
    "ModelType", "RopeLayout", "ScoringFunc", "TopkMethod", "rope_type", "yarn_mscale",
]
