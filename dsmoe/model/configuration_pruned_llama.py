"""Config of a block-pruned LLaMA (LLM-Pruner's block mode, `dsmoe.baselines.llm_pruner_block`).

A LLaMA whose decoder layers may each have their own number of query heads, key/value heads and
FFN width: the per-layer lists below; everything else is LlamaConfig's (`num_attention_heads`,
`num_key_value_heads` and `intermediate_size` keep the unpruned values, `head_dim` is explicit).
transformers' LlamaConfig has no per-layer sizes, hence this config. This file may import only
transformers: `save_pretrained` copies it next to the weights for `trust_remote_code=True` loading.
"""

from transformers import LlamaConfig


class PrunedLlamaConfig(LlamaConfig):
    r"""
    Args:
        layer_num_attention_heads: query heads of each decoder layer (default: num_attention_heads).
        layer_num_key_value_heads: key/value heads of each decoder layer, each dividing that layer's
            query heads (default: num_key_value_heads).
        layer_intermediate_sizes: FFN width of each decoder layer (default: intermediate_size).
    """

    model_type = "llama_block_pruned"

    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        n = self.num_hidden_layers
        for name, default in (("layer_num_attention_heads", self.num_attention_heads),
                              ("layer_num_key_value_heads", self.num_key_value_heads),
                              ("layer_intermediate_sizes", self.intermediate_size)):
            sizes = [default] * n if getattr(self, name) is None else [int(s) for s in getattr(self, name)]
            if len(sizes) != n or min(sizes) < 1:
                raise ValueError(f"{name} must list {n} positive sizes, one per layer, got {sizes}")
            setattr(self, name, sizes)
        for i, (q, kv) in enumerate(zip(self.layer_num_attention_heads, self.layer_num_key_value_heads)):
            if q % kv:
                raise ValueError(f"layer {i}: {q} query heads are not a multiple of its {kv} key/value heads")

    def layer_sizes(self, index):
        """The sizes that decoder layer `index` is built with."""
        return {"num_attention_heads": self.layer_num_attention_heads[index],
                "num_key_value_heads": self.layer_num_key_value_heads[index],
                "intermediate_size": self.layer_intermediate_sizes[index]}


__all__ = ["PrunedLlamaConfig"]
