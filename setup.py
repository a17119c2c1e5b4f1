"""Build hook: the wheel carries a copy of the top-level search_spaces/ (the folder users edit in
a checkout), so an installed ``virface-search`` has its default spaces. Everything else is in
setup.cfg."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithSearchSpaces(build_py):
    def run(self):
        super().run()
        source = Path(__file__).resolve().parent / "search_spaces"
        target = Path(self.build_lib) / "virface" / "search" / "default_spaces"
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(source.glob("*.yaml")):
            shutil.copyfile(path, target / path.name)


setup(cmdclass={"build_py": BuildPyWithSearchSpaces})
