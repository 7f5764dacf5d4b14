"""Uni-MoE: a unified multimodal LLM with modality-specialised Mixture-of-Experts."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming

from .errors import UniMoeConfigError, UniMoeInputError
from .modeling.beats import BEATsConfig, BEATsModel
from .modeling.configuration_unimoe import UniMoeConfig
from .modeling.configuration_unimoe_text import UniMoeTextConfig
from .modeling.conversion import (
    convert_release_multimodal_state_dict,
    convert_release_state_dict,
    load_release_language_model,
)
from .modeling.modeling_unimoe import LEGACY_KEY_RENAMES, UniMoeForConditionalGeneration, UniMoeModel
from .modeling.modeling_unimoe_text import UniMoeForCausalLM, UniMoeTextModel
from .modeling.upcycling import upcycle_llama
from .release import convert_release

AutoConfig.register(UniMoeTextConfig.model_type, UniMoeTextConfig)
AutoModel.register(UniMoeTextConfig, UniMoeTextModel)
AutoModelForCausalLM.register(UniMoeTextConfig, UniMoeForCausalLM)
AutoConfig.register(BEATsConfig.model_type, BEATsConfig)
AutoModel.register(BEATsConfig, BEATsModel)
AutoConfig.register(UniMoeConfig.model_type, UniMoeConfig)
AutoModel.register(UniMoeConfig, UniMoeModel)
AutoModelForImageTextToText.register(UniMoeConfig, UniMoeForConditionalGeneration)
register_checkpoint_conversion_mapping(
    UniMoeForConditionalGeneration.__name__,
    [WeightRenaming(source_patterns=old, target_patterns=new) for old, new in LEGACY_KEY_RENAMES],
)

__all__ = [
    "BEATsConfig",
    "BEATsModel",
    "UniMoeConfig",
    "UniMoeForConditionalGeneration",
    "UniMoeForCausalLM",
    "UniMoeConfigError",
    "UniMoeInputError",
    "UniMoeModel",
    "UniMoeTextConfig",
    "UniMoeTextModel",
    "convert_release",
    "convert_release_multimodal_state_dict",
    "convert_release_state_dict",
    "load_release_language_model",
    "upcycle_llama",
]
__version__ = "0.1.0"
