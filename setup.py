"""A build step, nothing else (the project is described in pyproject.toml): the wheel ships the coefficient files the
repository keeps in coeffs/ (TeaCache's published lists, the built-in models' calibrations) as calib/shipped/, so that
``calib.runtime.load("teacache-flux1-dev")`` finds them after ``pip install``. The list is
``calib.runtime.artifacts.SHIPPED``, read from its source (the build environment has no torch to import it with);
coeffs/ stays the one copy in the repository, and a checkout loads from it directly."""

import ast
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def shipped_patterns() -> tuple:
    tree = ast.parse((ROOT / "calib" / "runtime" / "artifacts.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SHIPPED" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError("calib/runtime/artifacts.py defines no SHIPPED")


class BuildPyWithCoefficients(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "calib" / "shipped"
        copied = 0
        for pattern in shipped_patterns():
            for source in sorted((ROOT / "coeffs").glob(pattern)):
                destination = target / source.relative_to(ROOT / "coeffs")
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, destination)
                copied += 1
        if not copied:
            raise RuntimeError("no coefficient files found in coeffs/ to ship")


setup(cmdclass={"build_py": BuildPyWithCoefficients})
