"""vLLM plugin: `vllm serve MODEL --attention-backend CUSTOM` stores the KV cache TurboQuant-compressed.

Importing this package does not import vLLM; `plugin.register` does, when vLLM loads its plugins.
The preset comes from `--additional-config '{"turboquant": "k3v3"}'` (see `settings.py`).
`--quantization turboquant` also stores the Linear weights as TurboQuant codes (`weights.py`).
"""
