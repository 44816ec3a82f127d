"""Everything two machines of a run must agree on. Imports neither ``node`` nor ``validator``.

- ``manifest.py``     the run manifest (TOML -> frozen dataclasses), its hash is the run's identity
- ``retry.py``        the one retry and timeout policy every network layer reads
- ``assignment.py``   which sequences a peer trains on, and the held-out split (pure)
- ``dataindex.py``    the run's data index and the safe reader of its token shards
- ``errors.py``       the one exception tree (drawn in its docstring)
- ``identity.py``     ed25519 keys and peer ids
- ``records.py``      small signed msgpack records (consensus, scores, announcements)
- ``urlfetch.py``     bounded GETs of the URLs peers announce (no redirects, public hosts)
- ``codec_types.py``  tensor layouts (chunks, tiles, k) and ``CompressedTensor``
- ``codec.py``        SparseLoCo: top-k per chunk, 2-bit values, error feedback
- ``indexcode.py``    Elias-Fano coding of in-chunk positions, 2-bit code packing
- ``wire.py``         the signed payload format and the decoder that trusts nothing
- ``aggregate.py``    deterministic aggregation of decoded payloads (fixed order, exact norms)
- ``consensus.py``    deciding what closes a window: Tendermint rounds between the trusted closers
- ``digest.py``       weights digest (exact-sync check)
- ``paths.py``        where each object of a run lives in a store
- ``scores.py``       validator score records and the rule combining several validators
- ``announce.py``     signed "read my objects here" records for per-peer buckets
- ``stores/``         the store interface and its file, memory, s3 and p2p backends
"""
