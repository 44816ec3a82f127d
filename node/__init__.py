"""A peer. One window flows through these modules in this order (``peer.Peer.run_window``):

- ``data.py``        offline corpus, BPE tokenizer, token shards, pure batch assignment
- ``model.py``       Hugging Face Llama presets, deterministic genesis weights, HF export
- ``inner.py``       H AdamW steps on the assigned batches (DDP under torchrun)
- ``replica.py``     the global weights, pseudo-gradient, outer step
- ``exchange.py``    publish, close (who counts), gather and verify payloads
- ``checkpoint.py``  resumable local state; published checkpoints for late joiners
- ``peer.py``        the window loop, catch-up, progress reporting
- ``ddp.py``         torchrun setup, DDP wrapping with the chosen gradient communication
- ``loco.py``        LoCo 4-bit gradient communication inside a multi-GPU peer (DDP hook)
- ``metrics.py``     the Prometheus metric set peers and validators export
- ``genesis.py``     ``locoswarm init``: create a run in a store
- ``up.py``          ``locoswarm up``: a whole local network with a live table and a plot
- ``status.py``, ``export.py``: read-only views of a run
- ``config.py``, ``accounting.py``: node-local settings; tokens, bytes and seconds spent
"""
