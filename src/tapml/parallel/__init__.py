"""Cache parallelism for long-context decode: the KV cache sharded along the sequence over devices, merged exactly
by log-sum-exp, beside tensor parallelism and the Helix-style hybrid, with an analytic model that says which to use.

Modules: merge (LSE merge, local and collective), attention (local attention with LSE), cache (ShardedKVCache for
transformers), models (the 8B and MQA shapes), plans (single/tp/cp/hybrid), costmodel (advise), run (the torchrun
driver), cli (`tapml parallel ...`). Importing this package imports no torch.distributed state.
"""
