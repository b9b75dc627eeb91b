"""What a model costs: exact parameter counts by role, and training FLOPs per token.

The scaling-law N is the *non-embedding* parameter count (Kaplan et al. 2020): the transformer
blocks, the final norm and the output head. Left out are the lookup tables (MIDI, codebook and
position embeddings: gathers, no FLOPs) and the start-embedding path (the timbre MLP or the learned
start / null vectors), which runs once per sequence, not once per token. Counts come from
`jax.eval_shape` of the initialiser, so they are exact for any config and allocate nothing.
"""
from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from tokensynth_jax.config import ModelConfig
from tokensynth_jax.model.transformer import abstract_model

EMBEDDING = ("midi_embed", "codebook_embed", "pos_embed")
CONDITIONING = ("timbre_fc1", "timbre_fc2", "start_embed", "null_embed")


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """Parameters of a model by role; `non_embedding` is the N of scaling laws."""

    total: int
    non_embedding: int  # blocks, final norm, output head
    embedding: int  # MIDI, codebook and position lookup tables
    conditioning: int  # timbre MLP or start vector (+ null timbre), once per sequence
    non_matmul: int  # biases and norm parameters among the non-embedding ones (no matmul FLOPs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Exact counts from the abstract initialised state (no memory is allocated)."""
    abstract = abstract_model(cfg)
    groups = {"embedding": 0, "conditioning": 0, "non_embedding": 0, "non_matmul": 0}
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(abstract, nnx.Param)):
        keys = [k.key for k in path if hasattr(k, "key")]  # module and variable names (not `.value`)
        size = int(leaf.size)
        if keys[0] in EMBEDDING:
            groups["embedding"] += size
        elif keys[0] in CONDITIONING:
            groups["conditioning"] += size
        else:
            groups["non_embedding"] += size
            groups["non_matmul"] += size if keys[-1] in ("bias", "scale") else 0
    return ParamCounts(total=groups["embedding"] + groups["conditioning"] + groups["non_embedding"], **groups)


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, PaLM's MFU convention: 6 N + 12 L T D.

    N counts the matmul parameters (blocks and output head; embedding lookups are gathers and
    cost no FLOPs); 12 L T D is attention's QK^T and AV over T positions, forward and backward.
    """
    n = cfg.num_layers * (4 * cfg.d_model**2 + 2 * cfg.d_model * cfg.mlp_dim) + cfg.d_model * cfg.output_size
    return 6.0 * n + 12.0 * cfg.num_layers * seq_len * cfg.d_model
