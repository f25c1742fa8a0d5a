"""In-place weight load for vLLM's CPU backend: copy, stack, re-pack; nothing else.

vLLM's ``reload_weights`` restores every layer onto the meta device, buffers each weight through a
wrapped loader, materializes, loads, processes and copies back (its layerwise reload, written for
quantized and online-processed models). For an unquantized model on one CPU process, the only work
that matters is: copy norms and embeddings into their parameters, stack q/k/v and gate/up into the
fused projections (the model's ``packed_modules_mapping``), and let each layer's own
``process_weights_after_loading`` build its packed oneDNN/sgl matmul handle again (the step that keeps
a tied ``lm_head`` from going stale, ``vllm-on-cpu.md``). *Scratch* (the tiny model in process):
``reload_weights`` 36-47 ms, of which 11 ms is handle creation.

``load_inplace`` checks every name and shape first and changes nothing unless the whole update fits
(unquantized layers, one tensor-parallel rank, known names); otherwise it returns False and the caller
uses ``reload_weights``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def _kinds():
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        UnquantizedEmbeddingMethod,
        VocabParallelEmbedding,
    )

    return LinearBase, UnquantizedLinearMethod, VocabParallelEmbedding, UnquantizedEmbeddingMethod


def _plan(model: torch.nn.Module, weights: Mapping[str, torch.Tensor]):
    """(linear pieces, embedding copies, plain copies), or None when the update does not fit."""
    linear_base, linear_method, embedding, embedding_method = _kinds()
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = {part: (fused, i) for fused, parts in getattr(model, "packed_modules_mapping", {}).items()
              for i, part in enumerate(parts)}
    linears: dict[str, dict[str, dict[int, torch.Tensor]]] = {}  # module -> leaf -> shard -> tensor
    embeddings: list[tuple[torch.nn.Module, torch.Tensor]] = []
    plain: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name, t in weights.items():
        mod_name, _, leaf = name.rpartition(".")
        parent, _, last = mod_name.rpartition(".")
        shard = 0
        if last in packed:
            fused, shard = packed[last]
            mod_name = f"{parent}.{fused}" if parent else fused
        m = modules.get(mod_name)
        if m is None:
            return None
        if isinstance(m, linear_base):
            if not isinstance(m.quant_method, linear_method) or getattr(m, "tp_size", 1) != 1:
                return None
            linears.setdefault(mod_name, {}).setdefault(leaf, {})[shard] = t
        elif isinstance(m, embedding):
            if not isinstance(m.quant_method, embedding_method) or getattr(m, "tp_size", 1) != 1 or leaf != "weight":
                return None
            if t.dim() != 2 or t.shape[0] > m.weight.shape[0] or t.shape[1] != m.weight.shape[1]:
                return None
            embeddings.append((m, t))
        else:
            p = params.get(name)
            if p is None or p.shape != t.shape:
                return None
            plain.append((p, t))
    stacked: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None]] = []
    for mod_name, leaves in linears.items():
        m = modules[mod_name]
        sizes = list(getattr(m, "output_partition_sizes", None) or [m.output_size_per_partition])
        if set(leaves) - {"weight", "bias"}:
            return None
        full = {}
        for leaf, shards in leaves.items():
            if sorted(shards) != list(range(len(sizes))):
                return None  # a fused projection needs every piece in one update
            parts = [shards[i] for i in range(len(sizes))]
            if any(p.shape[0] != s for p, s in zip(parts, sizes)):
                return None
            full[leaf] = torch.cat(parts) if len(parts) > 1 else parts[0].clone()  # owned, never a view
        w = full.get("weight")
        if w is None or w.shape != (sum(sizes), m.input_size_per_partition):
            return None
        b = full.get("bias")
        if (b is None) != (getattr(m, "bias", None) is None) or (b is not None and b.shape != m.bias.shape):
            return None
        stacked.append((m, w, b))
    return stacked, embeddings, plain


@torch.no_grad()
def load_inplace(model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> bool:
    """Load ``weights`` (Hugging Face names) into a vLLM CPU model in place; False (nothing changed)
    when the update does not fit this path."""
    plan = _plan(model, weights)
    if plan is None:
        return False
    stacked, embeddings, plain = plan
    for p, t in plain:
        p.data.copy_(t)
    for m, t in embeddings:
        m.weight.data[: t.shape[0]].copy_(t)
    # Re-pack every embedding layer over a changed parameter, a tied lm_head the update left out included.
    changed = {id(m.weight) for m, _ in embeddings}
    _, _, embedding, _ = _kinds()
    for m in model.modules():
        if isinstance(m, embedding) and id(m.weight) in changed:
            m.quant_method.process_weights_after_loading(m)  # re-pack from the new values
    for m, w, b in stacked:
        if b is not None:
            m.bias.data.copy_(b)
        m.weight = torch.nn.Parameter(w.to(m.weight.dtype), requires_grad=False)
        m.quant_method.process_weights_after_loading(m)  # builds the packed handle, drops the weight
    return True

