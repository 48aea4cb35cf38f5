"""Packaging beyond what pyproject.toml can say: the wheel carries static/, model/, the default study
and LICENSE inside the package as combot/_bundled/, where combot/resources.py finds them (the .pyz
uses the same layout). They stay at the top of the checkout, so a checkout and an editable install
read them in place; only a built wheel gets the copy."""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BUNDLED = ["static", "model", "combot.toml", "LICENSE"]
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.fp32.onnx", ".*")


class BuildWithBundle(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "combot" / "_bundled"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for name in BUNDLED:
            source = ROOT / name
            if not source.exists():
                raise SystemExit(f"missing {name}: build the wheel from a complete checkout")
            if source.is_dir():
                shutil.copytree(source, target / name, ignore=SKIP)
            else:
                shutil.copy2(source, target / name)


setup(cmdclass={"build_py": BuildWithBundle})
