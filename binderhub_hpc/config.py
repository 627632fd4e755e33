"""Traitlets configuration: one set of files for every process, checked
when it loads.

The hub, BinderHub and the command-line tools read the same
`c.SIFRegistry.root = ...` files (:func:`load_config_files`). Traitlets
checks a value only when the object that uses it is built, which for a
spawner or a build executor is the first launch or build; and it only logs
a setting whose name it does not know. :func:`check_config` builds each of
our configurable classes from the configuration at load time instead, so a
typo stops the service at start with the setting named::

    from binderhub_hpc.config import check_config
    check_config(c)   # last line of jupyterhub_config.py / binderhub_config.py
"""

import difflib
import importlib
import os

from traitlets import TraitError
from traitlets.config import Config, Configurable
from traitlets.config.loader import PyFileConfigLoader

#: every configurable class of ours, by module, in the order the reference lists them
CONFIGURABLES = (
    ("binderhub_hpc.registry", "SIFRegistry"),
    ("binderhub_hpc.builder.pipeline", "BuildPipeline"),
    ("binderhub_hpc.builder.repo2docker", "Repo2Docker"),
    ("binderhub_hpc.builder.limits", "BuildLimits"),
    ("binderhub_hpc.builder.export", "PodmanImage"),
    ("binderhub_hpc.builder.convert", "SquashfsSIFConverter"),
    ("binderhub_hpc.builder.convert", "ApptainerConverter"),
    ("binderhub_hpc.builder.runners", "LocalRunner"),
    ("binderhub_hpc.builder.runners", "SSHRunner"),
    ("binderhub_hpc.builder.runners", "SlurmBatchRunner"),
    ("binderhub_hpc.spawner.spawner", "SlurmBinderSpawner"),
    ("binderhub_hpc.spawner.spawner", "PBSBinderSpawner"),
    ("binderhub_hpc.spawner.runtime", "ApptainerRuntime"),
    ("binderhub_hpc.spawner.runtime", "PodmanRuntime"),
    ("binderhub_hpc.scheduler.reflector", "QueueReflector"),
    ("binderhub_hpc.scheduler.slurm", "SlurmQueue"),
    ("binderhub_hpc.scheduler.pbs", "PBSQueue"),
    ("binderhub_hpc.scheduler.tags", "JobTags"),
    ("binderhub_hpc.health", "HealthChecks"),
    ("binderhub_hpc.binderhub", "SIFBuildExecutor"),
    ("binderhub_hpc.binderhub", "SchedulerLaunchQuota"),
)


class ConfigError(ValueError):
    """Settings that cannot work; the message names each one."""


def load_config_files(paths):
    """One Config from Python config files, later files winning."""
    cfg = Config()
    for path in paths or ():
        loader = PyFileConfigLoader(os.path.basename(path), path=os.path.dirname(os.path.abspath(path)))
        cfg.merge(loader.load_config())
    return cfg


def configurable_classes(optional=True):
    """Our configurable classes. Those whose module needs a package that is
    not installed here (``binderhub`` on the hub host, ``batchspawner`` on
    BinderHub's) are left out when `optional`."""
    classes = []
    for module, name in CONFIGURABLES:
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except ImportError:
            if not optional:
                raise
    return classes


def _sections():
    """Config section name -> the class that checks it: each of our classes,
    and our mixins (``c.BinderBatchMixin`` configures both spawners), checked
    as the first concrete class that uses them."""
    sections = {}
    for cls in configurable_classes():
        for klass in cls.__mro__:
            if klass.__module__.startswith("binderhub_hpc.") and issubclass(klass, Configurable):
                sections.setdefault(klass.__name__, cls)
    return sections


def check_config(config):
    """Raise ConfigError listing every setting of our classes in `config`
    that is unknown or invalid; return `config`."""
    problems = []
    for name, cls in _sections().items():
        if name not in config or not config[name]:
            continue
        section = config[name]
        known = set(cls.class_trait_names(config=True))
        for key in sorted(section):
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean c.{name}.{close[0]}?" if close else ""
                problems.append(f"c.{name}.{key} is not a setting of {name}{hint}")
                continue
            try:
                cls(config=Config({name: {key: section[key]}}))
            except TraitError as e:
                setting = f"c.{name}.{key}"
                shown = repr(section[key])
                shown = shown if len(shown) <= 80 else shown[:77] + "..."
                problems.append(str(e) if str(e).startswith(setting) else f"{setting} = {shown}: {e}")
    problems += _tag_key_problems(config)
    if problems:
        raise ConfigError("invalid binderhub-hpc settings:\n  " + "\n  ".join(problems))
    return config


#: the settings that make a process tag session jobs (the hub's spawner) or
#: count them (BinderHub's quota): such a process needs the quota tags' key
_TAGGING_SETTINGS = (("JupyterHub", "spawner_class"), ("BinderHub", "launch_quota_class"))


def _tag_key_problems(config):
    """The quota tags' key, where this configuration tags or counts session
    jobs: missing, it is refused here, at load, rather than at the first
    launch (where quotas would otherwise count nothing)."""
    from .scheduler.tags import JobTags, MissingTagKey

    users = []
    for section, key in _TAGGING_SETTINGS:
        if section in config and key in config[section]:
            value = config[section][key]
            name = value if isinstance(value, str) else f"{value.__module__}.{value.__qualname__}"
            if name.startswith("binderhub_hpc."):
                users.append(f"c.{section}.{key} = {name.rsplit('.', 1)[-1]}")
    if not users:
        return []
    try:
        JobTags(config=config).key()
    except MissingTagKey as e:
        return [f"{' and '.join(users)} needs the quota tags' key: {e}"]
    except TraitError:
        return []  # an invalid c.JobTags.key_env is reported above
    return []
