"""Model quality and drift. prediction.py runs in replicas; the rest in the aggregator."""
