"""transformers' output capture (router logits, attentions, hidden states) without graph breaks in compiled layers.

transformers records per-layer outputs with forward hooks that read the active collector from a `ContextVar`.
Dynamo cannot trace `ContextVar.get`, so when only the decoder layers are compiled (the model's own forward, which
sets the collector, stays eager) every hooked module inside a layer - the router, the attention, the layer itself -
breaks the layer's graph. transformers' `CompileableContextVar` falls back to a plain global only when the collector
is set inside a compiled region. `compile_friendly_output_capture()` makes that global the only mode: the same
values reach the same hooks, but the collector is process-wide instead of per thread or context (one training step
at a time per process, as here).
"""

from __future__ import annotations


class _GlobalCollector:
    """The collector as one global slot (the interface of transformers' CompileableContextVar)."""

    def __init__(self):
        self.global_var = None
        self.compiling = True

    def get(self):
        return self.global_var

    def set(self, value):
        previous, self.global_var = self.global_var, value
        return previous  # the token: reset() restores it, so nested captures unwind as with a ContextVar

    def reset(self, token):
        self.global_var = token


def compile_friendly_output_capture() -> bool:
    """Swap transformers' collector for the global one (idempotent); False if this transformers has none."""
    try:
        from transformers.utils import output_capturing
    except ImportError:
        return False
    current = getattr(output_capturing, "_active_collector", None)
    if current is None:
        return False
    if not isinstance(current, _GlobalCollector):
        output_capturing._active_collector = _GlobalCollector()
    return True
