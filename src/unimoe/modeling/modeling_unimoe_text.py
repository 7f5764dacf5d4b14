"""The Uni-MoE language model: LLaMA decoder layers with shared self-attention and sparse MoE FFNs."""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from ..compat import cache_kwargs, model_output, pop_cache
from .configuration_unimoe_text import UniMoeTextConfig
from .moe import GroupedExperts, UniMoeSparseMoeBlock, load_balancing_loss, router_z_loss


@model_output
class UniMoeModelOutput(ModelOutput):
    """Decoder output. ``router_logits[i]`` ``[T, E]`` and ``expert_indices[i]`` ``[T, k]`` belong to the
    i-th MoE layer (``config.moe_layer_indices()[i]``); T = batch * sequence."""

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    expert_indices: tuple[torch.LongTensor, ...] | None = None


@model_output
class UniMoeCausalLMOutput(ModelOutput):
    """Causal LM output. ``loss = lm_loss + aux_coef * aux_loss + z_coef * z_loss`` when labels are given;
    ``aux_loss`` and ``z_loss`` are summed over MoE layers and reported unweighted."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    lm_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    expert_indices: tuple[torch.LongTensor, ...] | None = None


class UniMoeDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: self-attention shared by all modalities, then an MoE (or dense) SwiGLU FFN."""

    def __init__(self, config: UniMoeTextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        self.is_moe = layer_idx in config.moe_layer_indices()
        self.mlp = UniMoeSparseMoeBlock(config) if self.is_moe else LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        token_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``token_mask`` ``[B, S]`` (0 on padding): the MoE FFN skips padding tokens."""
        cache = pop_cache(cache, kwargs)
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            **cache_kwargs(cache),
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        router_logits = expert_indices = None
        if self.is_moe:
            hidden_states, router_logits, expert_indices = self.mlp(hidden_states, token_mask)
        else:
            hidden_states = self.mlp(hidden_states)
        return residual + hidden_states, router_logits, expert_indices


class UniMoeTextPreTrainedModel(PreTrainedModel):
    config_class = UniMoeTextConfig
    config: UniMoeTextConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["UniMoeDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, GroupedExperts):
            module.reset_parameters(self.config.initializer_range)


class UniMoeTextModel(UniMoeTextPreTrainedModel):
    """The decoder stack without the LM head."""

    def __init__(self, config: UniMoeTextConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(UniMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> UniMoeModelOutput:
        """``cache`` (or its older name ``past_key_values``) holds the keys and values of earlier steps."""
        cache = pop_cache(cache, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache(config=self.config)
        past_seen = cache.get_seq_length() if cache is not None else 0
        default_positions = position_ids is None
        if default_positions:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)

        # the current tokens' padding mask, when there is padding: MoE layers skip those tokens (not
        # checked in one-token decode steps, where it would cost a host sync per token)
        token_mask = None
        length = inputs_embeds.shape[1]
        if attention_mask is not None and attention_mask.dim() == 2 and length > 1:
            token_mask = attention_mask[:, -length:]
            token_mask = None if bool(token_mask.all()) else token_mask
        mask = attention_mask
        if token_mask is not None and not past_seen and default_positions and right_padded(attention_mask):
            # Right padding and no earlier tokens (training, scoring): causal attention alone gives
            # every real token the same result, since padding only ever follows real tokens. Without
            # a padding mask SDPA takes its causal kernels (FlashAttention on GPUs) and no
            # [B, 1, L, L] mask is built. Padding positions' outputs differ; nothing reads them (later
            # decode steps mask their cached keys).
            mask = None
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            position_ids=position_ids,
            **cache_kwargs(cache),
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        all_hidden: list[torch.Tensor] = []
        router_logits: list[torch.Tensor] = []
        expert_indices: list[torch.Tensor] = []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, logits, experts = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                position_embeddings=position_embeddings,
                token_mask=token_mask,
                **kwargs,
            )
            if logits is not None:
                router_logits.append(logits)
                expert_indices.append(experts)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        return UniMoeModelOutput(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            router_logits=tuple(router_logits),
            expert_indices=tuple(expert_indices),
        )


def right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row of a 0/1 ``[B, L]`` mask is ones, then zeros only (one host sync)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def moe_losses(
    router_logits: tuple[torch.Tensor, ...], token_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load-balancing and z-loss, each summed over the MoE layers."""
    aux = sum(load_balancing_loss(logits, token_mask) for logits in router_logits)
    z = sum(router_z_loss(logits, token_mask) for logits in router_logits)
    return torch.as_tensor(aux), torch.as_tensor(z)


def combine_losses(
    lm_loss: torch.Tensor,
    aux_loss: torch.Tensor | None,
    z_loss: torch.Tensor | None,
    aux_coef: float,
    z_coef: float,
    router_weight: float = 1.0,
) -> torch.Tensor:
    """The training objective: ``lm_loss + router_weight * (aux_coef * aux_loss + z_coef * z_loss)``.
    ``aux_loss``/``z_loss`` are None for a dense model; ``router_weight`` scales the router terms of one
    micro-batch within an accumulated step."""
    loss = lm_loss
    if aux_loss is not None:
        loss = loss + router_weight * aux_coef * aux_loss.to(lm_loss.device)
    if z_loss is not None and z_coef:
        loss = loss + router_weight * z_coef * z_loss.to(lm_loss.device)
    return loss


def causal_lm_output(
    model: PreTrainedModel,
    outputs: UniMoeModelOutput,
    labels: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    output_router_logits: bool | None = None,
    logits_to_keep: int | torch.Tensor = 0,
    logits_at_labels: bool = False,
    **kwargs,
) -> UniMoeCausalLMOutput:
    """LM head, losses and output of a causal LM (text-only or multimodal) over its decoder's output.

    ``logits_at_labels`` (training): the LM head runs only where a next-token label is set, and
    ``logits`` is ``[M, V]`` for those M positions in row-major order. The loss is the same; an
    instruction-tuning batch, whose prompts and media placeholders carry no labels, skips most of
    the head's work and its ``[B, L, V]`` logits.
    """
    config = model.config.get_text_config()
    if output_router_logits is None:
        output_router_logits = config.output_router_logits
    hidden_states = outputs.last_hidden_state
    loss = lm_loss = aux_loss = z_loss = None
    if logits_at_labels and labels is not None:
        # [B, L]: the token each position predicts
        targets = nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        labelled = targets != -100
        logits = model.lm_head(hidden_states[labelled])  # [M, V]
        lm_loss = model.loss_function(
            logits=logits,
            labels=None,
            shift_labels=targets[labelled],
            vocab_size=config.vocab_size,
            **kwargs,
        )
    else:
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = model.lm_head(hidden_states[:, keep, :])
        if labels is not None:
            lm_loss = model.loss_function(
                logits=logits, labels=labels, vocab_size=config.vocab_size, **kwargs
            )
    if labels is not None:
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask if attention_mask.shape[1] == hidden_states.shape[1] else None
        if outputs.router_logits:
            aux_loss, z_loss = moe_losses(outputs.router_logits, token_mask)
        loss = combine_losses(
            lm_loss, aux_loss, z_loss, config.router_aux_loss_coef, config.router_z_loss_coef
        )
    return UniMoeCausalLMOutput(
        loss=loss,
        logits=logits,
        cache=outputs.cache,
        hidden_states=outputs.hidden_states,
        lm_loss=lm_loss,
        aux_loss=aux_loss,
        z_loss=z_loss,
        router_logits=outputs.router_logits if output_router_logits else None,
        expert_indices=outputs.expert_indices if output_router_logits else None,
    )


class UniMoeForCausalLM(UniMoeTextPreTrainedModel, GenerationMixin):
    """Uni-MoE language model with an LM head; a drop-in transformers causal LM."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: UniMoeTextConfig):
        super().__init__(config)
        self.model = UniMoeTextModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_parts(cls, model: UniMoeTextModel, lm_head: nn.Linear) -> UniMoeForCausalLM:
        """A causal LM around an existing decoder and LM head (shared, not copied)."""
        with torch.device("meta"):  # no weights allocated for the parts replaced below
            causal_lm = cls(model.config)
        causal_lm.model = model
        causal_lm.lm_head = lm_head
        return causal_lm

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        logits_at_labels: bool = False,
        **kwargs,
    ) -> UniMoeCausalLMOutput:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=pop_cache(cache, kwargs),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        return causal_lm_output(
            self,
            outputs,
            labels=labels,
            attention_mask=attention_mask,
            output_router_logits=output_router_logits,
            logits_to_keep=logits_to_keep,
            logits_at_labels=logits_at_labels,
            **kwargs,
        )

    def merge_expert_lora(self) -> None:
        """Folds in-expert LoRA adapters into the expert weights (config updated to rank 0)."""
        for module in self.modules():
            if isinstance(module, GroupedExperts):
                module.merge_lora()
        self.config.expert_lora_rank = 0
