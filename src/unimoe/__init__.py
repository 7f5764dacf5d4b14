"""Uni-MoE: a unified multimodal LLM with modality-specialised Mixture-of-Experts."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from .errors import UniMoeInputError
from .modeling.beats import BEATsConfig, BEATsModel
from .modeling.configuration_unimoe import UniMoeConfig
from .modeling.configuration_unimoe_text import UniMoeTextConfig
from .modeling.conversion import (
    convert_release_multimodal_state_dict,
    convert_release_state_dict,
    load_release_language_model,
)
from .modeling.modeling_unimoe import UniMoeForConditionalGeneration
from .modeling.modeling_unimoe_text import UniMoeForCausalLM, UniMoeTextModel
from .modeling.upcycling import upcycle_llama

AutoConfig.register(UniMoeTextConfig.model_type, UniMoeTextConfig)
AutoModel.register(UniMoeTextConfig, UniMoeTextModel)
AutoModelForCausalLM.register(UniMoeTextConfig, UniMoeForCausalLM)
AutoConfig.register(BEATsConfig.model_type, BEATsConfig)
AutoModel.register(BEATsConfig, BEATsModel)
AutoConfig.register(UniMoeConfig.model_type, UniMoeConfig)
AutoModelForImageTextToText.register(UniMoeConfig, UniMoeForConditionalGeneration)

__all__ = [
    "BEATsConfig",
    "BEATsModel",
    "UniMoeConfig",
    "UniMoeForConditionalGeneration",
    "UniMoeForCausalLM",
    "UniMoeInputError",
    "UniMoeTextConfig",
    "UniMoeTextModel",
    "convert_release_multimodal_state_dict",
    "convert_release_state_dict",
    "load_release_language_model",
    "upcycle_llama",
]
__version__ = "0.1.0"
