"""Configs: loaded by name from inside the package or from a file of one's own, also from an
installed wheel run outside the checkout."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from detr_jax.config import CONFIG_DIR, Config, known_configs, load_config

USER_CONFIG = textwrap.dedent('''
    import dataclasses

    from detr_jax.config import load_config


    def get_config():
        base = load_config("detr_tiny")
        return dataclasses.replace(base, name="mine", model=dataclasses.replace(base.model, num_classes=3))
''')


def test_configs_live_in_the_package_and_load_by_name():
    assert CONFIG_DIR.parent.name == "detr_jax" and not (REPO / "configs").exists()
    assert {"detr_r50", "detr_r50_dc5_panoptic", "detr_tiny", "demo"} <= set(known_configs())
    config = load_config("detr_r50")
    assert isinstance(config, Config) and config.name == "detr_r50" and config.model.backbone == "resnet50"


def test_a_config_file_of_ones_own_loads_from_its_path(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(USER_CONFIG)
    for given in (path, str(path)):
        config = load_config(given)
        assert config.name == "mine" and config.model.num_classes == 3


def test_unknown_names_and_missing_files_are_named():
    with pytest.raises(FileNotFoundError, match="no config named 'detr_r5'; known: .*'detr_r50'"):
        load_config("detr_r5")
    with pytest.raises(FileNotFoundError, match="no config file .*nowhere.py"):
        load_config("/nowhere.py")


def test_an_installed_wheel_has_the_configs(tmp_path):
    """Build the wheel from a copy of the sources (no build isolation: offline), install it into a
    folder of its own, and load configs from a process started outside the checkout."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "detr_jax", source / "detr_jax", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
                                  str(source)], capture_output=True, text=True, cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel, = (tmp_path / "dist").glob("detr_jax-*.whl")
    installed = subprocess.run(pip + ["install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)],
                               capture_output=True, text=True, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr[-3000:]
    (tmp_path / "mine.py").write_text(USER_CONFIG)
    check = textwrap.dedent(f'''
        import pathlib
        import detr_jax
        from detr_jax.config import load_config, load_config_module
        assert pathlib.Path(detr_jax.__file__).is_relative_to({str(tmp_path / "site")!r}), detr_jax.__file__
        assert load_config("detr_r50_dc5_panoptic").model.dilation
        assert load_config("mine.py").name == "mine"
        assert hasattr(load_config_module("demo"), "get_config")
        print("ok")
    ''')
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    ran = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert ran.returncode == 0 and ran.stdout.strip() == "ok", ran.stderr[-3000:]
