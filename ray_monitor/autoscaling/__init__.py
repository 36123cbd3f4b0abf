"""Autoscaling on the monitor's hints.

Where each part runs: :mod:`~ray_monitor.autoscaling.policy` in Ray Serve's controller
(``policy_function="ray_monitor.autoscaling:MonitorPolicy"``, the import string users
write); :mod:`~ray_monitor.autoscaling.hints` and :mod:`~ray_monitor.autoscaling.external`
in the aggregator. Importing this package loads the policy only.
"""

from ray_monitor.autoscaling.policy import MonitorPolicy, monitor_policy

__all__ = ["MonitorPolicy", "monitor_policy"]
