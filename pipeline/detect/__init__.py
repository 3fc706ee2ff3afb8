"""Verdicts for embedded images (docs/architecture.md §9): is this image like its peers, and
does the picture agree with its header's label?

Modules, in the order a verdict is made::

    cohort      header fields -> cohort key (``CR/CHEST``), vendor spellings normalised
    scoring     pure numpy: kNN scores, neighbour tables, conformal p-values, robust trim
    admission   pure numpy: which images join a reference (bootstrap, growth, cap)
    reference   the reference sets in Redis: cached snapshots, optimistic transactions
    labels      zero-shot label check: prompt embeddings cached in Redis, softmax, margin
    detector    the glue a worker calls: assess (before storing) and learn (after)
    search      nearest stored images by cosine similarity (the store is handed in)
    transfer    reference sets to and from .npz files

The verdicts themselves (instance verdicts, the series / study aggregation rule) are
``pipeline.verdicts``, a leaf below both this package and ``pipeline.store``: the store keeps
verdicts without importing the detector, and nothing here imports the store.
"""
