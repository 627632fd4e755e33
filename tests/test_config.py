"""Settings are checked when the configuration loads, with the message an
admin needs: the setting, the value, what is allowed."""

import pytest
from traitlets import TraitError
from traitlets.config import Config

from binderhub_hpc.config import ConfigError, check_config, configurable_classes
from binderhub_hpc.spawner import templates
from binderhub_hpc.spawner.spawner import PBSBinderSpawner, SlurmBinderSpawner


def config(**sections):
    c = Config()
    for section, values in sections.items():
        for key, value in values.items():
            c[section][key] = value
    return c


@pytest.mark.parametrize(
    "section, key, value, allowed",
    [
        ("BuildPipeline", "converter", "apptainr", "'squashfs'"),
        ("SquashfsSIFConverter", "compressor", "zst", "'zstd'"),
        ("SlurmBinderSpawner", "container_runtime", "docker", "'podman'"),
        ("PBSBinderSpawner", "container_runtime", "Apptainer", "'apptainer'"),
        ("SIFRegistry", "formats", ["sif", "oci"], "'oci-archive'"),
        ("HealthChecks", "check_build_engine", "maybe", "'auto'"),
        ("HealthChecks", "scheduler", "lsf", "'pbs'"),
    ],
)
def test_a_bad_value_fails_at_load_naming_the_setting_and_what_is_allowed(section, key, value, allowed):
    with pytest.raises(ConfigError) as e:
        check_config(config(**{section: {key: value}}))
    msg = str(e.value)
    assert f"c.{section}.{key}" in msg and repr(value) in msg and allowed in msg


def test_a_misspelt_setting_fails_at_load_with_a_suggestion():
    with pytest.raises(
        ConfigError, match=r"c\.SIFRegistry\.rot is not a setting .* did you mean c\.SIFRegistry\.root\?"
    ):
        check_config(config(SIFRegistry={"rot": "/shared/registry"}))


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as e:
        check_config(config(SIFRegistry={"formats": []}, BuildPipeline={"converter": "x"}))
    assert "c.SIFRegistry.formats" in str(e.value) and "c.BuildPipeline.converter" in str(e.value)


def test_a_format_listed_twice_is_refused():
    with pytest.raises(ConfigError, match="lists a format twice"):
        check_config(config(SIFRegistry={"formats": ["sif", "sif"]}))


def test_valid_settings_pass_and_other_sections_are_left_to_their_owners():
    c = config(
        SIFRegistry={"root": "/shared/registry", "formats": ["sif", "oci-archive"]},
        BuildPipeline={"converter": "apptainer"},
        SlurmBinderSpawner={"container_runtime": "podman", "req_partition": "jupyter"},
        JupyterHub={"whatever_jupyterhub_checks": 1},
    )
    assert check_config(c) is c


def test_every_configurable_class_is_checked_and_documents_every_setting():
    classes = configurable_classes()
    assert SlurmBinderSpawner in classes and PBSBinderSpawner in classes
    for cls in classes:
        for name, trait in cls.class_traits(config=True).items():
            owner = next(k for k in cls.__mro__ if name in vars(k))
            if owner.__module__.startswith("binderhub_hpc"):
                assert trait.help.strip(), f"{owner.__name__}.{name} has no help"


@pytest.mark.parametrize("cls", [SlurmBinderSpawner, PBSBinderSpawner])
def test_a_batch_script_without_the_binder_setup_is_refused(cls):
    script = cls.batch_script.default_value.replace("{{binder_setup}}", "")
    with pytest.raises(TraitError, match=r"must contain \{\{binder_setup\}\}"):
        cls(config=config(**{cls.__name__: {"batch_script": script}}))


@pytest.mark.parametrize("cls", [SlurmBinderSpawner, PBSBinderSpawner])
def test_a_batch_script_without_the_server_command_is_refused(cls):
    script = cls.batch_script.default_value.replace("{{cmd}} &", "sleep 1 &")
    with pytest.raises(TraitError, match=r"must contain \{\{cmd\}\}"):
        cls(config=config(**{cls.__name__: {"batch_script": script}}))


def test_a_batch_script_with_an_unknown_name_or_bad_syntax_is_refused():
    with pytest.raises(TraitError, match=r"uses \{\{partiton\}\}, which the spawner does not define"):
        SlurmBinderSpawner(
            batch_script="#!/bin/bash\n#SBATCH --comment={{job_tag}}\n{{binder_setup}}\n{{cmd}} --p={{partiton}}\n"
        )
    with pytest.raises(TraitError, match=r"not a valid Jinja2 template \(line 4: Unexpected end"):
        SlurmBinderSpawner(batch_script="#!/bin/bash\n{% if partition %}\n{{job_tag}}{{binder_setup}}\n{{cmd}}\n")


def test_format_style_batch_scripts_work_as_in_batchspawner():
    script = (
        "#!/bin/bash\n#SBATCH --partition={partition}\n#SBATCH --comment={job_tag}\n{binder_setup}\n{cmd} &\nwait\n"
    )
    s = SlurmBinderSpawner(batch_script=script)
    out = templates.render_script(
        s.batch_script, {"partition": "jupyter", "job_tag": "TAG", "binder_setup": "SETUP", "cmd": "RUN"}
    )
    assert out == "#!/bin/bash\n#SBATCH --partition=jupyter\n#SBATCH --comment=TAG\nSETUP\nRUN &\nwait\n"
    with pytest.raises(TraitError, match=r"uses \{HOME\}"):
        SlurmBinderSpawner(batch_script="{binder_setup}\n#SBATCH --comment={job_tag}\ncd ${HOME}\n{cmd}\n")


def test_jinja_templates_render_strictly():
    with pytest.raises(Exception, match="'partition' is undefined"):
        templates.render_script("{{binder_setup}} {{cmd}} {{partition}}", {"binder_setup": "", "cmd": ""})


def test_the_default_job_scripts_pass_their_own_check():
    for cls in (SlurmBinderSpawner, PBSBinderSpawner):
        assert templates.check_script(cls.batch_script.default_value, cls().template_names()) is None


@pytest.mark.parametrize(
    "cls, carrier, why",
    [
        (
            SlurmBinderSpawner,
            "{% if job_tag %}#SBATCH --comment={{job_tag}}\n{% endif %}",
            r"\{\{job_tag\}\} is the quota tag",
        ),
        (
            PBSBinderSpawner,
            "{% if keepvars %}#PBS -v {{keepvars}}\n{% endif %}",
            r"\{\{keepvars\}\} names the variables .* BINDER_JOB_TAG",
        ),
    ],
)
def test_a_batch_script_without_the_quota_tag_is_refused(cls, carrier, why):
    """A job without its tag is never counted: quotas would let every launch through."""
    script = cls.batch_script.default_value
    assert carrier in script
    with pytest.raises(TraitError, match=why):
        cls(config=config(**{cls.__name__: {"batch_script": script.replace(carrier, "")}}))


def test_settings_on_the_spawner_mixin_are_checked_like_the_spawners_own():
    check_config(config(BinderBatchMixin={"req_partition": "jupyter", "job_user": "binder"}))
    with pytest.raises(ConfigError, match=r"c\.BinderBatchMixin\.container_runtime = 'dokcer'"):
        check_config(config(BinderBatchMixin={"container_runtime": "dokcer"}))
    with pytest.raises(ConfigError, match=r"c\.BinderBatchMixin\.job_usr is not a setting"):
        check_config(config(BinderBatchMixin={"job_usr": "binder"}))
