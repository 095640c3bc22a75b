"""Trained adapters against their base: reading an adapter directory into a spec (merge.read_adapter), merging
it in memory or streaming it shard by shard (streaming_merge), `lora-rl merge` itself, the names of adapters
put side by side on one base (names), and the adapter as an inference engine (vLLM) takes it from memory
(engine_adapter).

May import: models (to load a base), training (checkpoint files), and the foundation. Never rl, commands or cli.
Adapter *files* (config, weights, pickle refusal, atomic save) are read and written in training.checkpoint,
below models, because building a model reads them too.
"""
