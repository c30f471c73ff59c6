"""Ulysses sequence parallelism (train.sequence_parallel = P): DeepSpeed's UlyssesSPAttentionHF
on top of ZeRO-3, for rows longer than one rank can hold.

The P ranks of a group (consecutive ranks, r // P the same) take the same rows; each row's
positions are cut into P equal chunks (padded to a multiple of P) and rank p of the group runs
the model on chunk p. Attention is the one part that needs every position: DeepSpeed's Ulysses
attention trades sequence for heads (all-to-all), so each rank attends over the whole row with
1/P of the heads, then trades back. Everything else in the model works per position. Behind it,
`sdpa` runs causal attention once per dialogue of the whole row (found from the gathered position
ids; attention.varlen_attention), so packed dialogues still see only themselves and no [S, S] mask
is ever made.

Around the model (step.py, eval/validation.py): targets are shifted over the whole row before it
is cut, so each position keeps its own target; each rank's per-token NLL is gathered over the
group (detached) into the whole row's, and the per-turn losses, statistics, weights and the audit
come from that, exactly as for the unsharded row. The gradient flows through each rank's own
chunk: the sum over its positions of w * NLL / N, which over the group is the row's. To DeepSpeed
every rank is a data-parallel rank (ZeRO-3 partitions over all and averages gradients over all;
engine.backward's world factor covers that), so a checkpoint is that of any run on as many ranks
and resumes on any world size. The group's first rank alone merges the statistics, counts the
metrics and writes the audit rows: the others hold the same rows. The loader serves
data-parallel rank r // P of world // P.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..data import IGNORE
from .. import dist
from . import attention


class SequenceParallel:
    def __init__(self, size: int, rank: int, world: int):
        if size < 1 or world % size:
            raise ConfigError(f"train.sequence_parallel={size} must divide the number of ranks ({world})")
        self.size, self.group = size, dist.new_groups(size)
        self.sp_rank, self.dp_rank, self.dp_world = rank % size, rank // size, world // size

    @property
    def on(self) -> bool:
        return self.size > 1

    @property
    def leader(self) -> bool:
        """The rank of its group that merges statistics, counts metrics and writes audit rows."""
        return self.sp_rank == 0

    def install(self, model_config, attn_implementation: str) -> None:
        """Route the model's attention through DeepSpeed's Ulysses attention (after the engine's
        start-up checks, which run whole rows on every rank)."""
        if not self.on:
            return
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        core = ALL_ATTENTION_FUNCTIONS[attn_implementation]

        def attend(module, query, key, value, attention_mask, *args, position_ids=None, **kwargs):
            if attn_implementation != "sdpa":  # flash-attention and varlen read packed rows off position_ids
                return core(module, query, key, value, attention_mask, *args, position_ids=position_ids, **kwargs)
            # causal attention within each dialogue of the whole row (found from the gathered position
            # ids): no [S, S] mask
            return attention.varlen_attention(module, query, key, value, None, *args, position_ids=position_ids,
                                              **kwargs)

        arch = model_config.get_text_config()
        heads, kv = arch.num_attention_heads, arch.num_key_value_heads
        if heads % self.size or (kv % self.size and self.size % kv):
            raise ConfigError(f"train.sequence_parallel={self.size}: the model has {heads} attention heads and {kv} "
                              "key-value heads; Ulysses gives each rank of a group an equal share of the heads, so "
                              "the group size must divide the heads (and divide, or be a multiple of, the key-value "
                              "heads)")
        head_dim = getattr(arch, "head_dim", None) or arch.hidden_size // arch.num_attention_heads
        ulysses = UlyssesSPAttentionHF(attn=attend, batch_size=1, attn_head_count=arch.num_attention_heads,
                                       attn_head_size=head_dim, kv_head_count=arch.num_key_value_heads,
                                       num_hidden_layers=arch.num_hidden_layers, process_group=self.group,
                                       seq_length_is_variable=True)

        def wrapper(module, query, key, value, attention_mask, *args, **kwargs):
            _fit_batch(ulysses, query.shape[0])
            return ulysses(module, query, key, value, None, *args, **kwargs)

        ALL_ATTENTION_FUNCTIONS[attn_implementation] = wrapper

    def shard(self, batch: dict, tg):
        """This rank's chunk of a batch and of its whole-row targets (stats.turns.Targets): input and
        position ids only (a padded batch gets position ids 0..S-1 and no attention mask: its
        padding is at the end, where causal attention never looks back from a real token)."""
        ids = batch["input_ids"]
        S = ids.shape[1]
        pos = batch.get("position_ids")
        if pos is None:
            pos = torch.arange(S)[None].expand_as(ids)
        pad = -S % self.size
        chunk = (S + pad) // self.size
        a, b = self.sp_rank * chunk, (self.sp_rank + 1) * chunk

        def cut(x: torch.Tensor, fill) -> torch.Tensor:
            return F.pad(x, (0, pad), value=fill)[:, a:b] if pad else x[:, a:b]

        positions = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(pad)[None]], 1) if pad else pos
        local = {"input_ids": cut(ids, 0), "position_ids": positions[:, a:b]}
        return local, tg._make((cut(tg.labels, IGNORE), cut(tg.turn, -1), cut(tg.doc, -1)))  # stats.turns.Targets

    def gather(self, nll_local: torch.Tensor, length: int) -> torch.Tensor:
        """The whole row's per-token NLL from every rank's chunk (detached), cut to `length`."""
        return dist.group_gather_cat(nll_local, self.group)[:, :length]


def _fit_batch(ulysses, batch_size: int) -> None:
    """DeepSpeed's Ulysses attention checks shapes against one batch size; ours varies (validation,
    a last short batch): set it per call. Its sequence lengths it sets itself (variable length)."""
    if ulysses.batch_size == batch_size:
        return
    u = ulysses
    u.batch_size = batch_size
    u.required_query_shape = torch.Size([1, batch_size, u.attn_head_count, u.attn_head_size])
    u.required_key_value_shape = torch.Size([1, batch_size, u.global_kv_head_count, u.attn_head_size])
    u.required_context_shape = torch.Size([1, batch_size, u.attn_head_size * u.attn_head_count // u.world_size])
