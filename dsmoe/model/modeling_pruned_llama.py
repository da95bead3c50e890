"""A block-pruned LLaMA: LlamaForCausalLM whose decoder layers each have their own head counts and
FFN width (`PrunedLlamaConfig`). Each layer is transformers' own LlamaDecoderLayer, built with a view
of the config that overrides that layer's sizes, so the forward, caches and attention backends are
LLaMA's. This file may import only torch, transformers and its sibling files: `save_pretrained`
copies it next to the weights so that checkpoints load with `trust_remote_code=True` without `dsmoe`.
"""

from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from .configuration_pruned_llama import PrunedLlamaConfig


class LayerConfigView:
    """The model's config with one layer's sizes overridden; every other attribute (the attention
    backend included) is read from the model's config when used."""

    def __init__(self, config, **sizes):
        self._config = config
        self.__dict__.update(sizes)

    def __getattr__(self, name):
        if "_config" not in self.__dict__:  # a copy or unpickling that has not set it yet
            raise AttributeError(name)
        return getattr(self.__dict__["_config"], name)


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = PrunedLlamaConfig

    def __init__(self, config: PrunedLlamaConfig):
        # LlamaForCausalLM builds full-size layers, replaced here: a transient dense decoder stack, the
        # price of reusing LLaMA's own __init__ rather than copying it
        super().__init__(config)
        self.model.layers = nn.ModuleList(
            [LlamaDecoderLayer(LayerConfigView(config, **config.layer_sizes(i)), i) for i in range(config.num_hidden_layers)])
        self.post_init()


__all__ = ["LayerConfigView", "PrunedLlamaForCausalLM"]
