"""Layer distillation (Presto-L, Novack et al. 2024, "Presto! Distilling Steps and Layers for Accelerating Music
Generation", arXiv 2410.05167, Sec. 3.3): a transformer student that skips some of its teacher's blocks.

Presto drops whole DiT blocks of the student and trains it against the full teacher; a dropped block is not run
and the hidden state passes it unchanged (identity: each diffusers transformer block adds its attention and MLP
outputs to the residual stream itself, so skipping it is exactly "add nothing"). Presto keeps the final block: its
output statistics are the ones the output head was trained on (the paper's variance argument), and in SD3 the last
joint block is the only one that emits no text stream, so removing it would change the architecture. Here the
student's network *is* the smaller transformer: the skipped blocks are removed from its ``transformer_blocks``
(Flux: and ``single_transformer_blocks``) and its config says how many remain, so training runs only the kept
blocks, distribution matching (DMD2, SiD, ...) needs no change (the fake score and teacher stay full), and the
exported student is an ordinary diffusers transformer with ``num_layers`` reduced that the pipeline loads itself.
(Only the abstract, "preserving hidden state variance", could be read from this machine; keeping the final block
follows our reading of Presto-L's improvement over ASE, which drops the deepest blocks including the last.)

Block indices count in execution order: Flux's double-stream blocks first, then its single-stream blocks.
No public code of Presto was found (the authors release neither model nor code); this follows the paper.

Budget-conditioned variant (``student.layer_budget`` B, ``with_layer_budget``): one student trained over budgets,
as Presto-L trains one model for all budgets. Each training forward draws a budget b uniform in 0..B and drops the
b blocks just before the final one (Presto keeps the final block; which others it drops is our choice: the deepest,
as ASE's early exit does); the budget is an input through a learned, zero-initialised embedding (B + 1 rows) added
to the bias of the layer that makes the image tokens, so every token of the residual stream knows its budget and
budget 0 starts as the teacher exactly. In eval mode (sample grids) and in the export the budget is
``student.export_budget``: the export drops those blocks and folds that row into the bias (``exportable``), the same
addition the student's forward does, so the exported transformer is bit for bit the student at that budget.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FastdiffError

# ModuleList attribute -> config key counting its blocks, in execution order.
BLOCK_LISTS = (("transformer_blocks", "num_layers"), ("single_transformer_blocks", "num_single_layers"))
# Models whose output layer reads its conditioning from block 0's embedding (diffusers' DiT / Transformer2DModel):
# removing block 0 would change the output layer, not only skip a block.
READS_BLOCK_ZERO = ("DiTTransformer2DModel", "Transformer2DModel")


def block_lists(model: nn.Module) -> list[tuple[str, str, nn.ModuleList]]:
    """(attribute, config key, blocks) of a diffusers transformer's block lists, in execution order."""
    found = [(attr, key, getattr(model, attr)) for attr, key in BLOCK_LISTS
             if isinstance(getattr(model, attr, None), nn.ModuleList)]
    if not found:
        raise FastdiffError(f"layer distillation (student.skip_layers, layer_budget) needs a transformer teacher (DiT, "
                            f"SD3, PixArt, Flux, Sana); {type(model).__name__} has no transformer_blocks")
    return found


def num_blocks(model: nn.Module) -> int:
    return sum(len(blocks) for _, _, blocks in block_lists(model))


def check_skip(model: nn.Module, skip) -> list[int]:
    """The sorted indices to skip, or a one-line FastdiffError for indices the model cannot drop."""
    total = num_blocks(model)
    skip = sorted(set(int(i) for i in skip))
    bad = [i for i in skip if not 0 <= i < total]
    if bad:
        raise FastdiffError(f"student.skip_layers {bad} out of range: {type(model).__name__} has blocks 0..{total - 1}")
    if total - 1 in skip:
        raise FastdiffError(f"student.skip_layers: the final block ({total - 1}) is kept (Presto keeps it; SD3's last "
                            "block is the only one without a text output)")
    if 0 in skip and type(model).__name__ in READS_BLOCK_ZERO:
        raise FastdiffError(f"student.skip_layers: {type(model).__name__} reads its output conditioning from block 0's "
                            "embedding; block 0 cannot be skipped")
    return skip


def drop_blocks(model: nn.Module, skip) -> nn.Module:
    """Remove the blocks ``skip`` (execution-order indices) from ``model`` in place and update its config
    (``num_layers`` / ``num_single_layers``; SD3's ``dual_attention_layers`` re-indexed to the kept blocks), so
    ``save_pretrained`` writes a transformer that ``from_pretrained`` rebuilds with the kept blocks' weights."""
    skip = set(check_skip(model, skip))
    if not skip:
        return model
    updates, start = {}, 0
    for attr, key, blocks in block_lists(model):
        kept = [i for i in range(len(blocks)) if start + i not in skip]
        if attr == "transformer_blocks" and "dual_attention_layers" in model.config:
            dual = set(model.config.dual_attention_layers or ())
            updates["dual_attention_layers"] = tuple(new for new, old in enumerate(kept) if old in dual)
        setattr(model, attr, nn.ModuleList(blocks[i] for i in kept))
        updates[key] = len(kept)
        start += len(blocks)
    model.register_to_config(**updates)
    return model


def forward_flops(model: nn.Module, **inputs) -> int:
    """FLOPs of one forward of ``model`` on ``inputs`` (torch's flop counter: matmuls and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(**inputs)
    return counter.get_total_flops()


# The layer that turns latents into image tokens, per family: SD3 / PixArt / DiT, Sana, Flux.
TOKEN_LAYERS = ("pos_embed.proj", "patch_embed.proj", "x_embedder")


class BudgetBias(nn.Module):
    """A token-embedding layer (Conv2d or Linear) whose bias is ``bias + embedding[budget]``."""

    def __init__(self, layer: nn.Module, budgets: int):
        super().__init__()
        self.layer = layer
        self.embedding = nn.Parameter(torch.zeros(budgets + 1, layer.bias.shape[0], dtype=layer.bias.dtype,
                                                  device=layer.bias.device))
        self.budget = 0

    def bias(self) -> torch.Tensor:
        return self.layer.bias + self.embedding[self.budget]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, self.layer.weight, self.bias())
        return F.linear(x, self.layer.weight, self.bias())

    def folded(self) -> nn.Module:
        """The plain layer with this budget's row added to its bias (the forward's own addition)."""
        with torch.no_grad():
            self.layer.bias.copy_(self.bias())
        return self.layer


def budget_blocks(total: int, budget: int) -> list[int]:
    """The blocks a budget drops: the ``budget`` blocks just before the final one."""
    return list(range(total - 1 - budget, total - 1))


def _token_layer(model: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    for path in TOKEN_LAYERS:
        parent_path, _, name = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
        except AttributeError:
            continue
        layer = getattr(parent, name, None)
        if isinstance(layer, (nn.Conv2d, nn.Linear, BudgetBias)) and getattr(layer, "bias", None) is not None:
            return parent, name, layer
    raise FastdiffError(f"student.layer_budget: {type(model).__name__} has no token embedding layer with a bias "
                        f"({', '.join(TOKEN_LAYERS)})")


def with_layer_budget(model: nn.Module, budgets: int, export_budget: int | None = None) -> nn.Module:
    """Make ``model`` (in place) a budget-conditioned student over budgets 0..``budgets`` (see the module docstring)."""
    total = num_blocks(model)
    if not 0 < budgets < total:
        raise FastdiffError(f"student.layer_budget {budgets}: {type(model).__name__} has {total} blocks, so 1..{total - 1} "
                            "(the final block is kept)")
    check_skip(model, budget_blocks(total, budgets))  # e.g. DiT's block 0
    export_budget = budgets if export_budget is None else export_budget
    if not 0 <= export_budget <= budgets:
        raise FastdiffError(f"student.export_budget must be in 0..{budgets} (student.layer_budget), got {export_budget}")
    parent, name, layer = _token_layer(model)
    setattr(parent, name, BudgetBias(layer, budgets))
    model.fastdiff_layer_budget, model.fastdiff_export_budget, model.fastdiff_budget = budgets, export_budget, None
    model.register_forward_pre_hook(_enter_budget)
    model.register_forward_hook(_leave_budget, always_call=True)
    return model


def is_budget_conditioned(model: nn.Module) -> bool:
    return getattr(model, "fastdiff_layer_budget", None) is not None


def current_budget(model: nn.Module) -> int:
    """``fastdiff_budget`` when set (tests, a chosen budget); uniform in 0..B while training; the export budget else."""
    if model.fastdiff_budget is not None:
        return model.fastdiff_budget
    if model.training:
        return int(torch.randint(model.fastdiff_layer_budget + 1, ()))
    return model.fastdiff_export_budget


def _enter_budget(model: nn.Module, args) -> None:
    """Forward pre-hook: this call's budget; its dropped blocks leave the block lists until the forward returns."""
    budget = current_budget(model)
    model.fastdiff_last_budget = budget
    full = {attr: blocks for attr, _, blocks in block_lists(model)}
    drop, start = set(budget_blocks(sum(len(b) for b in full.values()), budget)), 0
    for attr, blocks in full.items():
        model._modules[attr] = nn.ModuleList(blk for i, blk in enumerate(blocks) if start + i not in drop)
        start += len(blocks)
    model._fastdiff_full_blocks = full
    _token_layer(model)[2].budget = budget


def _leave_budget(model: nn.Module, args, output) -> None:
    """Forward hook (also on errors): the full block lists back."""
    for attr, blocks in model.__dict__.pop("_fastdiff_full_blocks", {}).items():
        model._modules[attr] = blocks


def exportable(model: nn.Module) -> nn.Module:
    """A budget-conditioned student as the plain transformer at its export budget (a copy); other models unchanged."""
    if not is_budget_conditioned(model):
        return model
    net = copy.deepcopy(model)
    for hooks in (net._forward_pre_hooks, net._forward_hooks):
        for key in [k for k, fn in hooks.items() if fn in (_enter_budget, _leave_budget)]:
            del hooks[key]
            net._forward_hooks_always_called.pop(key, None)
    budget = net.fastdiff_export_budget
    parent, name, wrapper = _token_layer(net)
    wrapper.budget = budget
    setattr(parent, name, wrapper.folded())
    for attr in ("fastdiff_layer_budget", "fastdiff_export_budget", "fastdiff_budget", "fastdiff_last_budget"):
        net.__dict__.pop(attr, None)
    return drop_blocks(net, budget_blocks(num_blocks(net), budget))
