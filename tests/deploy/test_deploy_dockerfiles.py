"""Every Dockerfile passes hadolint, and every image's entry point starts from wheels built as its Dockerfile does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HADOLINT = Path(sys.executable).parent / "hadolint"
DOCKERFILES = sorted(
    p for p in ROOT.rglob("Dockerfile*") if not {".venv", ".git", "node_modules"} & set(p.relative_to(ROOT).parts)
)


@dataclass(frozen=True)
class Image:
    directory: str  # the package directory, holding the Dockerfile
    distribution: str
    script: str
    local: tuple[str, ...] = ()  # our unpublished packages it depends on, wheeled beside it


# One line per Python image; a package directory that does not exist yet is skipped.
IMAGES = [
    Image("pg-worker", "widelink-pg-worker", "pg-worker"),
    Image("wl-workers", "widelink-wl-workers", "wl-workers", local=("pg-worker",)),
    Image("payment-webhook", "widelink-payment-webhook", "payment-webhook", local=("pg-worker",)),
    Image("wl-console", "widelink-wl-console", "wl-console", local=("pg-worker",)),
]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint(dockerfile: Path) -> None:
    result = subprocess.run(
        [str(HADOLINT), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(dockerfile)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    result = subprocess.run([str(HADOLINT), "--config", str(ROOT / ".hadolint.yaml"), str(bad)], capture_output=True)
    assert result.returncode != 0


@pytest.fixture(scope="session")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, set[str]]:
    """One fresh virtualenv (no pip index), one wheel directory and the sources already wheeled, per session."""
    base = tmp_path_factory.mktemp("images")
    venv.EnvBuilder(with_pip=True).create(base / "venv")
    return base / "venv" / "bin", base / "wheels", set()


@pytest.mark.slow
@pytest.mark.parametrize("image", IMAGES, ids=lambda i: i.directory)
def test_entrypoint_starts_from_wheels(image: Image, image_venv: tuple[Path, Path, set[str]]) -> None:
    package = ROOT / image.directory
    if not (package / "pyproject.toml").exists():
        pytest.skip(f"{image.directory}/ is not on this branch yet")
    if not (package / "Dockerfile").exists():
        pytest.skip(f"{image.directory}/Dockerfile is not on this branch yet")
    dockerfile = (package / "Dockerfile").read_text()
    # What this test repeats must be what the image does.
    assert "pip wheel" in dockerfile and "PIP_CONSTRAINT=" in dockerfile
    assert "--no-index" in dockerfile and image.distribution in dockerfile
    assert f'ENTRYPOINT ["{image.script}"]' in dockerfile
    sources = [*image.local, image.directory]
    assert all(f"COPY {d} " in dockerfile for d in sources), f"the image wheels {sources}"
    bin_dir, wheels, wheeled = image_venv
    env = {**os.environ, "PIP_CONSTRAINT": str(ROOT / "requirements" / "constraints.txt")}
    quiet = ["--disable-pip-version-check", "--quiet"]
    subprocess.run(
        # --find-links: our packages wheeled by an earlier row are taken from there, as in one `pip wheel` call
        [sys.executable, "-m", "pip", "wheel", *quiet, "--wheel-dir", str(wheels), "--find-links", str(wheels),
         *(str(ROOT / d) for d in sources if d not in wheeled)],
        env=env, check=True, timeout=300,
    )  # fmt: skip
    wheeled.update(sources)
    subprocess.run(
        [str(bin_dir / "pip"), "install", *quiet, "--no-index", "--find-links", str(wheels), image.distribution],
        # No pip configuration either: nothing but the wheel directory can supply a package.
        env={**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_CONSTRAINT": ""}, check=True, timeout=300,
    )  # fmt: skip
    result = subprocess.run([str(bin_dir / image.script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout.lower()


def test_base_images_are_pinned_and_python_is_the_tested_version() -> None:
    """issue 14: a floating tag rebuilds into something untested; the images run the Python the tests run (3.11)."""
    for dockerfile in DOCKERFILES:
        for line in dockerfile.read_text().splitlines():
            if line.startswith("FROM "):
                image = line.split()[1]
                assert re.search(r":\d+\.\d+\.\d+", image), f"{dockerfile}: {image} is not pinned to a patch release"
                if image.startswith("python:"):
                    assert image.startswith("python:3.11."), f"{dockerfile}: {image} (tests run on Python 3.11)"
