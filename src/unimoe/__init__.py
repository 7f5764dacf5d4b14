"""Uni-MoE: a unified multimodal LLM with modality-specialised Mixture-of-Experts."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .errors import UniMoeInputError
from .modeling.configuration_unimoe_text import UniMoeTextConfig
from .modeling.modeling_unimoe_text import UniMoeForCausalLM, UniMoeTextModel

AutoConfig.register(UniMoeTextConfig.model_type, UniMoeTextConfig)
AutoModel.register(UniMoeTextConfig, UniMoeTextModel)
AutoModelForCausalLM.register(UniMoeTextConfig, UniMoeForCausalLM)

__all__ = [
    "UniMoeForCausalLM",
    "UniMoeInputError",
    "UniMoeTextConfig",
    "UniMoeTextModel",
]
__version__ = "0.1.0"
