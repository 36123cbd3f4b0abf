"""The names by which the cluster's parts find each other.

Imported by every process: replicas find their node's merger (and, without one, the
aggregator) by actor name, node mergers and GPU actors find the aggregator; the aggregator finds its state in Ray's GCS key-value store under these keys; the
driver and the CLI find both. Changing one is a change of the wire contract.
"""

__all__ = ["AGGREGATOR_NAME", "CONFIG_KEY", "GPU_ACTOR_PREFIX", "KV_NAMESPACE", "NAMESPACE",
           "NODE_MERGER_PREFIX", "NOTIFY_LOG_KEY", "PORT_KEY", "PRICES_KEY", "STATE_KEY", "gpu_actor_name",
           "node_merger_name"]

#: The aggregator actor's name and Ray namespace.
AGGREGATOR_NAME = "ray_monitor_aggregator"
NAMESPACE = "ray_monitor"

#: Ray GCS key-value namespace and keys of the aggregator's state.
KV_NAMESPACE = "ray_monitor"
#: Alert and hint state, written after each evaluation that changed them.
STATE_KEY = b"ray_monitor/aggregator/state"
#: The notification log, written before each notification is sent (and after its answer).
NOTIFY_LOG_KEY = b"ray_monitor/aggregator/notification_log"
#: Rules and notifications changed after start: a restarted actor uses these, not the
#: arguments it was first created with.
CONFIG_KEY = b"ray_monitor/aggregator/config"
#: The HTTP port, reused by a restarted aggregator so scrape configs keep working.
PORT_KEY = b"ray_monitor/aggregator/port"
#: The rule file's token prices, for the replicas' span attributes: JSON
#: ``{model: [prompt_per_1k, completion_per_1k]}`` (``*`` for any other model).
PRICES_KEY = b"ray_monitor/aggregator/prices"

#: GPU-stats actors are named this plus the first 12 hex digits of their node id.
GPU_ACTOR_PREFIX = "ray_monitor_gpu_"


def gpu_actor_name(node_id: str) -> str:
    return GPU_ACTOR_PREFIX + node_id[:12]


#: Node mergers (one per node with monitored replicas) are named this plus the first 12
#: hex digits of their node id: a replica finds its own node's by name.
NODE_MERGER_PREFIX = "ray_monitor_node_"


def node_merger_name(node_id: str) -> str:
    return NODE_MERGER_PREFIX + node_id[:12]
