"""Forward passes that start or stop at a decoder layer: router inputs collected without running the layers above,
and hidden states cached below a layer so that plans which differ only above it are scored from there."""

from __future__ import annotations


import torch



_MISSING = object()


class _Stop(Exception):
    pass


def _passthrough(hidden_states=None, *args, **kwargs):
    return hidden_states


def run_partial(mm, ids: torch.Tensor, *, start: int = 0, hidden: torch.Tensor | None = None,
                stop: int | None = None) -> torch.Tensor:
    """Run the model on ``ids`` with decoder layers ``< start`` skipped and ``hidden`` fed into layer ``start``.

    With ``stop``, return the hidden states entering decoder layer ``stop`` (nothing above it runs);
    otherwise return the logits. Embeddings, masks and position embeddings are computed as usual, so the
    result equals a full forward whose layers below ``start`` produced ``hidden``.
    """
    layers = mm.decoder_layers
    handles, patched, captured = [], [], {}
    try:
        if hidden is not None and start > 0:
            for i in range(start):
                layer = layers[i]
                patched.append((layer, layer.__dict__.get("forward", _MISSING)))
                layer.forward = _passthrough

            def feed(module, args, kwargs):
                if args:
                    return (hidden,) + tuple(args[1:]), kwargs
                kwargs = dict(kwargs)
                kwargs["hidden_states"] = hidden
                return args, kwargs

            handles.append(layers[start].register_forward_pre_hook(feed, with_kwargs=True))
        if stop is not None:
            def grab(module, args, kwargs):
                captured["h"] = args[0] if args else kwargs["hidden_states"]
                raise _Stop

            handles.append(layers[stop].register_forward_pre_hook(grab, with_kwargs=True))
        try:
            out = mm.model(input_ids=ids, use_cache=False)
        except _Stop:
            return captured["h"]
        if stop is not None:  # pragma: no cover - the stop layer always runs
            raise RuntimeError(f"decoder layer {stop} was not reached")
        return out.logits
    finally:
        for h in handles:
            h.remove()
        for layer, prev in patched:
            if prev is _MISSING:
                del layer.forward
            else:
                layer.forward = prev


def _forward_stack(mm, ids: torch.Tensor) -> None:
    """A forward pass that skips the LM head when the model exposes its decoder stack."""
    base = getattr(mm.model, "model", None)
    if isinstance(base, torch.nn.Module) and any(m is mm.decoder_layers for m in base.children()):
        base(input_ids=ids, use_cache=False)
    else:
        mm.model(input_ids=ids, use_cache=False)


def _batches(blocks: torch.Tensor, batch_size: int):
    for i in range(0, blocks.shape[0], batch_size):
        yield blocks[i:i + batch_size]
