"""Real models for the worker: Llama-family architectures over mpkv's paged KV pool, from Hugging Face
checkpoints. Pure (no processes, no shared memory): the worker calls them with its pool tensor.

- ``hf_config``: ``read_config(dir)`` -> ``ModelConfig`` (transformers 4.x and 5.x config.json);
- ``weights``: ``load_weights(dir, cfg, rank, tp)`` -> this rank's shard (safetensors, single or sharded);
- ``llama``: ``LlamaModel(cfg, weights, rank=, tp=, all_reduce=)`` with ``prefill``, ``decode`` and ``forward``;
- ``sampling``: greedy, temperature and top-p, each draw seeded by the request's seed and the token's position;
- ``runner``: ``HFRunner``, the worker's plug-in for a checkpoint directory.
"""

from mpkv.models.hf_config import ModelConfig, RopeConfig, parse_config, read_config
from mpkv.models.llama import AllReduce, Chunk, LlamaModel
from mpkv.models.sampling import next_tokens
from mpkv.models.weights import RankWeights, load_weights

__all__ = [
    "AllReduce",
    "Chunk",
    "LlamaModel",
    "ModelConfig",
    "RankWeights",
    "RopeConfig",
    "load_weights",
    "next_tokens",
    "parse_config",
    "read_config",
]
