"""The one reader of a rule file: every caller reads it here, and gets all of it checked.

Runs in the CLI (``rules check``, ``rules export``, ``start --rules``), in the driver
(``ray_monitor.start(rules=...)``) and in the aggregator (start and reload). A rule file
is YAML (a path, the text, or the parsed dict) with up to four sections::

    groups: [...]           alert rules and SLOs            (ray_monitor.alerting.groups)
    autoscaling: {...}      targets and bounds for hints     (ray_monitor.autoscaling.config)
    notifications: {...}    receivers and route              (ray_monitor.alerting.notify_config)
    prices: {...}           token prices per model           (ray_monitor.alerting.prices)

It decides what is a path and what is text, checks every section, and raises one
:class:`~ray_monitor.common.errors.ConfigError` carrying every problem of every section
(each naming the file; the group and rule, or the deployment; and the field), so a file
is either wholly usable or refused with all that is wrong in it.

Hostile files are bounded before they cost anything: at most :data:`MAX_RULE_FILE_BYTES`,
at most :data:`MAX_YAML_NODES` nodes once YAML aliases are followed (a few hundred bytes
of nested aliases otherwise expand to gigabytes), at most :data:`MAX_YAML_DEPTH` levels
deep; and every message is short (``ConfigError`` caps its text). The YAML is parsed
by libyaml when PyYAML has it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, TypeVar, Union

import yaml

from ray_monitor.alerting.groups import parse_groups
from ray_monitor.alerting.model import RuleSet
from ray_monitor.alerting.notify_config import NotifyConfig
from ray_monitor.alerting.prices import Price, parse_prices
from ray_monitor.autoscaling.config import HintConfig, parse_hint_config
from ray_monitor.common.errors import ConfigError, Problem

__all__ = ["MAX_RULE_FILE_BYTES", "MAX_YAML_DEPTH", "MAX_YAML_NODES", "RuleFile", "RuleSource",
           "load_hint_config", "load_rule_file", "load_rules"]

#: What a rule file may be given as: a path (``str`` or ``Path``), YAML text, or a dict.
RuleSource = Union[str, Path, Mapping]

_SECTIONS = ("groups", "autoscaling", "notifications", "prices")
#: Largest rule file (the default one is 5 KiB).
MAX_RULE_FILE_BYTES = 1024 * 1024
#: Nodes a file may hold once aliases are followed: a file without aliases has fewer
#: nodes than bytes, so only alias bombs reach it.
MAX_YAML_NODES = 200_000
MAX_YAML_DEPTH = 64
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_HOW = "pass a path to a YAML file, the YAML text, or a dict"
T = TypeVar("T")


@dataclass(frozen=True)
class RuleFile:
    """A rule file, every section checked.

    ``source`` is what to persist and hand on (to the aggregator, to a restarted one):
    the file's text, the text given, or the dict given.
    """

    file: str
    ruleset: RuleSet
    autoscaling: HintConfig
    notifications: Optional[dict]
    source: Union[str, Mapping]
    prices: Mapping[str, Price] = field(default_factory=dict)  # model -> token prices


def _names_a_file(source: Union[str, Path]) -> bool:
    # One line that ends in .yaml, or names something on disk, was meant as a path even
    # when it is missing: "no such file" helps more than a YAML error about a path.
    return isinstance(source, Path) or ("\n" not in source and (
        source.endswith((".yaml", ".yml")) or os.path.exists(source)))


def _check_size(size: int, file: str) -> None:
    if size > MAX_RULE_FILE_BYTES:
        raise ConfigError.one(file, None, f"the rule file is {size} bytes; at most "
                              f"{MAX_RULE_FILE_BYTES} are read: split it or trim it")


def _check_expansion(root: yaml.Node, file: str) -> None:
    """Refuses a document whose aliases expand past MAX_YAML_NODES, or that nests deeper
    than MAX_YAML_DEPTH, counting each node once per place it appears (without building
    anything: shared nodes are measured once)."""
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded nodes, depth)
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            sizes[id(node)] = (1, 1)
            continue
        if not children_done:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
            if len(stack) > MAX_YAML_NODES:
                break
            continue
        size = 1 + sum(sizes[id(c)][0] for c in children)
        depth = 1 + max((sizes[id(c)][1] for c in children), default=0)
        if size > MAX_YAML_NODES:
            raise ConfigError.one(file, None, f"YAML aliases expand to more than "
                                  f"{MAX_YAML_NODES} nodes; write the file without nested "
                                  "aliases")
        if depth > MAX_YAML_DEPTH:
            raise ConfigError.one(file, None, f"YAML nested deeper than {MAX_YAML_DEPTH} levels")
        sizes[id(node)] = (size, depth)
    if len(stack) > MAX_YAML_NODES:
        raise ConfigError.one(file, None, f"more than {MAX_YAML_NODES} YAML nodes")


def _parse_yaml(text: str, file: str) -> Any:
    _check_size(len(text.encode("utf-8", "surrogatepass")), file)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, file)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError.one(file, None, f"YAML syntax error{where}: {problem}"[:500]) from None
    except RecursionError:
        raise ConfigError.one(file, None, f"YAML nested deeper than {MAX_YAML_DEPTH} "
                              "levels") from None
    finally:
        loader.dispose()


def _read(source: Any, filename: Optional[str],
          from_text: bool) -> tuple[Any, str, Union[str, Mapping]]:
    """(the parsed data, the name for messages, what to persist)."""
    if isinstance(source, Mapping):
        return source, filename or "<rules>", source
    if not isinstance(source, (str, Path)) or (from_text and not isinstance(source, str)):
        raise ConfigError.one(filename or "<rules>", None, f"a rule file cannot be a "
                              f"{type(source).__name__}; {_HOW}")
    if from_text:  # text sent over the wire is never a path on this machine
        return _parse_yaml(source, filename or "<rules>"), filename or "<rules>", source
    if _names_a_file(source):
        file = filename or str(source)
        try:
            _check_size(Path(source).stat().st_size, file)
            text = Path(source).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError.one(file, None, f"cannot read the rule file: "
                                  f"{exc.strerror or exc}; {_HOW}") from None
        return _parse_yaml(text, file), file, text
    file = filename or "<rules>"
    if "\n" in source:
        return _parse_yaml(source, file), file, source
    # A single line is taken as YAML only when it reads as a mapping ("groups: []"):
    # a word like "myrules" is a path that does not exist, not a rule file.
    try:
        data = _parse_yaml(source, file)
    except ConfigError:
        data = None
    if not isinstance(data, Mapping):
        raise ConfigError.one(file, None, f"no rule file {source!r}; {_HOW}")
    return data, file, source


def _collect(problems: list[Problem], check: Callable[[], T]) -> Optional[T]:
    """``check()``, or None with its problems added to ``problems``."""
    try:
        return check()
    except ConfigError as exc:
        problems.extend(exc.problems)
        return None


def load_rule_file(source: RuleSource, *, filename: Optional[str] = None,
                   from_text: bool = False) -> RuleFile:
    """Read a rule file and check every section of it.

    ``source``: a ``Path``; a one-line string that ends in ``.yaml``/``.yml`` or names an
    existing file (read as a file); YAML text; or a dict. With ``from_text`` a string is
    always YAML text (the aggregator reads what callers sent, never its own disk).
    ``filename`` names it in messages (default: the path, or ``<rules>``). Raises
    :class:`~ray_monitor.common.errors.ConfigError` listing every problem in the file.
    """
    data, file, kept = _read(source, filename, from_text)
    if not isinstance(data, Mapping):
        raise ConfigError.one(file, None, "the file must be a mapping with a 'groups' list, "
                              "like 'groups: [{name: serving, rules: [...]}]'")
    problems = [Problem(file, field=str(key), message=f"unknown top-level key {key!r}; the "
                        f"file holds {', '.join(_SECTIONS[:-1])} and {_SECTIONS[-1]}")
                for key in data if key not in _SECTIONS]
    groups = _collect(problems, lambda: parse_groups(data.get("groups"), file=file))
    autoscaling = _collect(problems, lambda: parse_hint_config(data.get("autoscaling"), file=file))
    notifications = data.get("notifications")
    if notifications is not None:
        # Checked as a whole here; the environment fills in receivers only where it runs.
        _collect(problems, lambda: NotifyConfig.from_dict(notifications, env={}, file=file))
    prices = _collect(problems, lambda: parse_prices(data.get("prices"), file=file))
    if problems:
        raise ConfigError(problems)
    return RuleFile(file=file, ruleset=RuleSet(groups, file), autoscaling=autoscaling,
                    notifications=None if notifications is None else dict(notifications),
                    source=kept, prices=prices)


def load_rules(source: RuleSource, *, filename: Optional[str] = None) -> RuleSet:
    """The alert rules of a rule file, read by :func:`load_rule_file` (every section is
    checked all the same)."""
    return load_rule_file(source, filename=filename).ruleset


def load_hint_config(source: Optional[RuleSource], *,
                     filename: Optional[str] = None) -> HintConfig:
    """The ``autoscaling:`` section of a rule file, read by :func:`load_rule_file`.

    No rule file at all (``None``, ``""`` or ``{}``, as an aggregator started without
    rules holds) gives an empty config."""
    if source is None or (isinstance(source, (str, Mapping)) and not source):
        return HintConfig()
    return load_rule_file(source, filename=filename).autoscaling
