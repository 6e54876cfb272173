"""vLLM worker extension: receives weights as safetensors bytes when the engine runs in other processes.

Loaded by vLLM inside its worker (`worker_extension_cls`); must stay importable without Ray.
"""

from __future__ import annotations


class WeightSyncExtension:
    def update_weights_from_bytes(self, blob: bytes) -> None:
        from safetensors.torch import load

        self.reload_weights(weights_iterator=list(load(blob).items()))
