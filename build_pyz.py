"""Build dist/combot.pyz: one file that runs Combot on any machine with a matching Python.

    python build_pyz.py                       # for this machine's platform and Python
    python build_pyz.py --platform manylinux_2_28_aarch64 --python-version 3.12

The archive holds the combot package, static/, model/, the default combot.toml and every run-time
dependency, made with shiv (https://shiv.readthedocs.io): native libraries (onnxruntime, tokenizers,
numpy) are unpacked once into ~/.shiv on first start (SHIV_ROOT moves it). Only run-time
dependencies go in: nothing for tests, building or torch. Needs only Python and pip (22.3 or later);
pip resolves in an empty environment of its own, whatever the builder's interpreter has installed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# Resolved with their dependencies.
RUNTIME = ["starlette>=0.40", "hypercorn>=0.17", "sqlite-utils>=3.36", "click>=8.1", "httpx>=0.27", "numpy>=1.26"]
# Installed without their declared dependencies: onnxruntime's (sympy, protobuf, flatbuffers, packaging)
# serve its model tools, and tokenizers' (huggingface_hub and its tree) serve downloads, neither of
# which Combot uses; inference needs only numpy, which is above.
NO_DEPS = ["onnxruntime>=1.17", "tokenizers>=0.15"]
BUNDLED = ["static", "model", "combot.toml", "LICENSE"]
SHIV = "shiv==1.0.8"


def resolver(folder: Path) -> Path:
    """An empty environment for pip to resolve in: with `--target`, pip still checks what it installs
    against the packages of the interpreter it runs for, so the builder's own site-packages (a
    project's venv, a conda base) would make it print resolver ERROR lines about packages that never
    go into the archive."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    return folder / "bin" / "python"


def pip(python: Path, *args: str) -> None:
    # This pip, run for the empty interpreter (`pip --python`, pip 22.3+); nothing from the
    # environment's PYTHONPATH or user site leaks in.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE")}
    env["PYTHONNOUSERSITE"] = "1"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check", "install",
                    "--quiet", *args], check=True, env=env)


def expand_platforms(platform: str | None) -> list[str]:
    """A glibc 2.N Linux also runs wheels built for older glibc; this pip does not infer that."""
    tags: list[str] = []
    for tag in (platform or "").split(","):
        tag = tag.strip()
        match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", tag)
        if match:
            newest, arch = int(match.group(1)), match.group(2)
            tags += [f"manylinux_2_{minor}_{arch}" for minor in range(newest, 16, -1)] + [f"manylinux2014_{arch}"]
        elif tag:
            tags.append(tag)
    return list(dict.fromkeys(tags))


def target_args(platform: str | None, python_version: str | None) -> list[str]:
    args: list[str] = []
    if platform or python_version:
        args += ["--only-binary=:all:", "--implementation", "cp"]
        for tag in expand_platforms(platform):
            args += ["--platform", tag]
        version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
        args += ["--python-version", version]
        # pip guesses only the version's own ABI; tokenizers ships abi3 wheels, pure packages "none".
        for abi in (f"cp{version.replace('.', '')}", "abi3", "none"):
            args += ["--abi", abi]
    return args


def build(output: Path, platform: str | None = None, python_version: str | None = None) -> Path:
    for name in BUNDLED:
        if not (ROOT / name).exists():
            raise SystemExit(f"missing {name}: run this from a complete checkout")
    if not any((ROOT / "model").glob("*.onnx")):
        raise SystemExit("model/ has no .onnx file: build it with `python tools/build_model.py`")
    with tempfile.TemporaryDirectory(prefix="combot-pyz-") as tmp:
        site = Path(tmp) / "site-packages"
        tools = Path(tmp) / "tools"
        extra = target_args(platform, python_version)
        python = resolver(Path(tmp) / "resolver")
        pip(python, "--target", str(site), "--no-compile", *extra, *RUNTIME)
        pip(python, "--target", str(site), "--no-compile", "--no-deps", *extra, *NO_DEPS)
        # The package itself, with its data inside it, so it is found wherever shiv unpacks it.
        shutil.copytree(ROOT / "combot", site / "combot", ignore=shutil.ignore_patterns("__pycache__", "_bundled"))
        bundled = site / "combot" / "_bundled"
        bundled.mkdir()
        for name in BUNDLED:
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(source, bundled / name, ignore=shutil.ignore_patterns("__pycache__", "*.fp32.onnx"))
            else:
                shutil.copy2(source, bundled / name)
        # sqlite-utils declares pip for its `install` command, which Combot never runs.
        for unused in ("pip", "bin"):
            shutil.rmtree(site / unused, ignore_errors=True)
        for cache in site.rglob("__pycache__"):
            shutil.rmtree(cache, ignore_errors=True)
        # shiv runs from its own temporary install: the build needs nothing but pip.
        pip(python, "--target", str(tools), SHIV)
        output.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(tools)}
        subprocess.run([sys.executable, "-m", "shiv", "--site-packages", str(site), "--entry-point", "combot.cli:main",
                        "--output-file", str(output), "--python", "/usr/bin/env python3", "--compressed", "--compile-pyc",
                        "--reproducible"], check=True, env=env, stdout=subprocess.DEVNULL)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(ROOT / "dist" / "combot.pyz"), help="where to write the archive")
    parser.add_argument("--platform", help="wheel platform tag(s) of the target machine, comma-separated, e.g. "
                        "manylinux_2_28_x86_64 or manylinux_2_28_aarch64 (a glibc 2.28+ Linux; default: this machine)")
    parser.add_argument("--python-version", help="the target machine's Python, e.g. 3.12 (default: this Python)")
    args = parser.parse_args()
    output = build(Path(args.output), args.platform, args.python_version)
    size = output.stat().st_size / 1e6
    print(f"built {output} ({size:.1f} MB)")
    print(f"run it with: python3 {output} serve")


if __name__ == "__main__":
    main()
