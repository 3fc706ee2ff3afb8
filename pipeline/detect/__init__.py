"""Verdicts for embedded images (docs/architecture.md §9): is this image like its peers, and
does the picture agree with its header's label?

Modules, in the order a verdict is made::

    cohort      header fields -> cohort key (``CR/CHEST``), vendor spellings normalised
    scoring     pure numpy: kNN scores, neighbour tables, conformal p-values, robust trim
    admission   pure numpy: which images join a reference (bootstrap, growth, cap)
    reference   the reference sets in Redis: cached snapshots, optimistic transactions
    labels      zero-shot label check: prompt embeddings cached in Redis, softmax, margin
    verdict     instance verdicts and the series / study aggregation rule
    detector    the glue a worker calls: assess (before storing) and learn (after)
    search      nearest stored images by cosine similarity

Nothing is imported here, so ``pipeline.store`` can use ``verdict`` without import cycles.
"""
