"""A tiny mixture-of-experts model whose experts are a ``ModuleList`` of MLPs (the layout of transformers before 5
and of remote code), built from a tiny fused Qwen3-MoE model with the same weights, for tests of both layouts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel


class ModuleListMoeBlock(nn.Module):
    """Router ``gate`` (Qwen3-MoE's top-k router) and ``experts``, one MLP module per expert, looped over as the
    Mixtral and Qwen-MoE code of transformers 4 does (tokens of one expert in routing order)."""

    def __init__(self, fused_block: nn.Module) -> None:
        super().__init__()
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeMLP

        fused = fused_block.experts
        config = fused.config
        self.gate = fused_block.gate
        size = int(fused.down_proj.shape[2])
        self.experts = nn.ModuleList()
        for e in range(int(fused.down_proj.shape[0])):
            mlp = Qwen3MoeMLP(config, intermediate_size=size)
            with torch.no_grad():
                gate, up = fused.gate_up_proj[e].chunk(2, dim=0)
                mlp.gate_proj.weight.copy_(gate)
                mlp.up_proj.weight.copy_(up)
                mlp.down_proj.weight.copy_(fused.down_proj[e])
            self.experts.append(mlp)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden)
        _, weights, selected = self.gate(flat)
        out = torch.zeros_like(flat)
        routed = F.one_hot(selected, num_classes=len(self.experts)).permute(2, 1, 0)  # [E, k, N]
        for e, expert in enumerate(self.experts):
            slot, token = torch.where(routed[e])
            if token.numel() == 0:
                continue
            y = expert(flat[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out.reshape(batch, seq, hidden)


def module_list_model(model: PreTrainedModel) -> PreTrainedModel:
    """``model`` (a tiny Qwen3-MoE) with every MoE block rebuilt as a :class:`ModuleListMoeBlock`, same weights."""
    for layer in model.model.layers:
        layer.mlp = ModuleListMoeBlock(layer.mlp)
    return model.eval()
