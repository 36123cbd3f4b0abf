"""Runs in the aggregator actor (one per cluster). ``actor`` is the Ray actor and
``get_or_create``; ``core`` ingests snapshots and runs the evaluation round; the window
store is ``windows`` (snapshot to series), ``rings`` (storage) and ``window_query`` (what
a query means); ``http_api`` serves every route, shaped by ``views`` and, for /metrics,
``exposition``; ``status_page`` is the page and its assets; ``persistence`` is what
outlives a restart (Ray's GCS); ``gpu_actors`` keeps one GPU-stats actor per node;
``trace_store`` keeps the traces of slow and failed requests."""
