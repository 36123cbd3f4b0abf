"""Runs in the aggregator (and, to read rule files, in the CLI and the driver).

One module per concept: :mod:`.loader` is the one reader of a rule file, which checks
its sections with :mod:`.groups` (alert rules, with :mod:`.expr`, :mod:`.templates` and
:mod:`.slo`), :mod:`ray_monitor.autoscaling.config` and :mod:`.notify_config`, into the
rule model of :mod:`.model`. The aggregator runs :mod:`.engine` (the alert state machine)
and sends with :mod:`.notifier` (:mod:`.dispatch` groups, :mod:`.payloads` shapes);
:mod:`.export` writes the rules as a Prometheus rule file.
"""
