"""The Hook module (HookMoE): a tiny bias-free MLP placed in front of a chosen MoE block.

``x <- x + r * W2 ReLU(W1 x)`` with ``r`` a learnable scalar (0.5 at init). The Hook sits *inside* the
MoE block: a forward pre-hook on ``MoELayer.block`` replaces the block's input by the Hook's output, so
the router, the routed experts and the shared experts all see it. The decoder layer adds its residual
outside the block from the un-hooked input, so the residual stream is untouched — true for every
supported architecture (transformers 5.x: ``residual = h; h = post_attention_layernorm(h); h = mlp(h);
h = residual + h``; Granite scales by ``residual_multiplier``; GPT-OSS's block also returns router scores).

The Hook is registered as a real submodule of the block (``block.hookmoe_hook``), so ``state_dict``,
``.to()`` and ``requires_grad`` work; :func:`remove_hooks` deletes it and the pre-hook.

Like a PEFT adapter, a trained Hook is a directory (:func:`attach_hooks` / :meth:`HookSet.save_pretrained`):

* ``hook.safetensors`` — tensors ``layers.<i>.linear1.weight`` ``[inner, hidden]``,
  ``layers.<i>.linear2.weight`` ``[hidden, inner]``, ``layers.<i>.r`` ``[]`` per hooked decoder layer ``i``;
* ``hookmoe.json`` — format version, the base model (source, architecture, ``fingerprint()``, hidden
  size), hooked layers, hook dims and init, the routing plan it was trained for, training config, final
  metrics and the SHA-256 of the weights file.

Attaching it to a model it was not made for (other fingerprint, other hidden size, missing layer) or a
corrupt/truncated file is refused with an :class:`~hookmoe.errors.ArtifactError`.

``hookmoe export`` writes a self-contained directory: the base model (``save_pretrained``) and its
tokenizer, the hook (``hook/``), the plan (``plan.json``) and ``hookmoe_export.json``;
``hookmoe.models.load(OUT)`` restores all three (:func:`load_export`).

Other compensators (:mod:`hookmoe.hook.compensators`) share the container (:class:`HookSet`), the artifact layout (the
manifest records ``"kind"``: ``hook`` | ``router`` | ``output`` | ``hook+router`` ...; absent = ``hook``) and the
training loop: a router delta (a trainable ``dW`` on the router's logit weight, swapped in while the router runs) and
a low-rank correction added to the MoE block's output.
"""

from .artifact import WEIGHTS_NAME, CONFIG_NAME, base_model_info, read_manifest, read_weights
from .export import EXPORT_FORMAT, EXPORT_NAME, export_model, load_export, load
from .compensators import KINDS, PARTS, DEFAULT_KIND, RouterDelta, OutputLowRank, parse_kind, parse_budget, size_for_budget
from .inject import SUBMODULE, HookSet, parse_layers, insert_hooks, insert_compensators, remove_hooks, get_hooks, attach_hooks
from .module import HOOK_FORMAT, INITS, DEFAULT_INIT, R_INIT, Hook

__all__ = [
    "WEIGHTS_NAME",
    "CONFIG_NAME",
    "base_model_info",
    "read_manifest",
    "read_weights",
    "EXPORT_FORMAT",
    "EXPORT_NAME",
    "export_model",
    "load_export",
    "load",
    "SUBMODULE",
    "HookSet",
    "parse_layers",
    "insert_hooks",
    "insert_compensators",
    "KINDS",
    "PARTS",
    "DEFAULT_KIND",
    "RouterDelta",
    "OutputLowRank",
    "parse_kind",
    "parse_budget",
    "size_for_budget",
    "remove_hooks",
    "get_hooks",
    "attach_hooks",
    "HOOK_FORMAT",
    "INITS",
    "DEFAULT_INIT",
    "R_INIT",
    "Hook",
]
