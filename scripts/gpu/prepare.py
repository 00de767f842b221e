"""Build, on a machine with pip and a network, everything the GPU machine lacks for the study.

The GPU machine (see docs/results/idrid-gpu/README.md) has Python 3.12, PyTorch,
torchvision, timm, matplotlib and the build tools, but no network, no cobalance, no
segmentation-models-pytorch and no kornia. This writes one folder (default
``.gpu-carry/``, ignored by git) that travels with the working tree:

==================  ============================================================
path                what
==================  ============================================================
``idrid/``          the IDRiD half-resolution images (JPEG, as shipped) and masks
                    (1-bit PNG), ``index.csv`` and the data README (attribution);
                    the most compact form of the study's input
``whl/``            cp312 wheels: segmentation-models-pytorch, kornia, kornia-rs
                    (their other requirements are on the GPU machine) and
                    cobalance built from this checkout
``manifest.json``   what was written, from which commit (and the hash of the
                    extension's sources the wheel was built from), and the sizes
==================  ============================================================

Every step keeps what is already there and correct, so a second call is quick; each
file is written under a temporary name and renamed. The total that travels (tracked
files, untracked files git does not ignore, and this folder) is checked against the
64 MiB that may travel to the GPU machine.

Usage (from the repository root)::

    python3 scripts/gpu/prepare.py                      # everything, the full data
    python3 scripts/gpu/prepare.py --max-images 4 --no-wheels --carry /tmp/c   # a test
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: What may travel to the GPU machine with a run (tracked + untracked-not-ignored + carried).
TRAVEL_LIMIT = 64 * 1024 * 1024
#: Versions that import beside the GPU machine's torch 2.11 / timm (the ones .venv-train
#: runs here); their other requirements (numpy, pillow, safetensors, huggingface-hub,
#: timm, torchvision, tqdm, packaging) are installed there.
WHEELS = ("segmentation-models-pytorch==0.6.0", "kornia==0.9.0", "kornia-rs==0.2.0")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
BUILD_REQUIREMENTS = ("scikit-build-core", "pybind11", "cmake", "ninja", "numpy")


def _atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def copy_data(src: Path, dst: Path, max_images=None) -> dict:
    """Copy the IDRiD folder (``images/``, ``masks/<class>/``, ``index.csv``, README) to ``dst``.

    ``max_images`` keeps the first images by name (and only their masks). Files already
    in ``dst`` with the source's size are kept. Returns counts and bytes.

    Raises
    ------
    ValueError
        ``src`` without an ``images`` folder of JPEG/PNG files, or ``max_images < 1``.
    """
    images_dir = src / "images"
    if not images_dir.is_dir():
        raise ValueError(f"data folder {str(src)!r} has no images/ folder (expected the IDRiD layout)")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not images:
        raise ValueError(f"data folder {str(images_dir)!r} holds no .jpg or .png image")
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f"max_images must be a positive integer, got {max_images!r}")
        images = images[:max_images]
    stems = {p.stem for p in images}
    files = [(p, dst / "images" / p.name) for p in images]
    for class_dir in sorted(d for d in (src / "masks").iterdir() if d.is_dir()):
        files += [(p, dst / "masks" / class_dir.name / p.name) for p in sorted(class_dir.iterdir())
                  if p.is_file() and p.stem in stems]
    for name in ("index.csv", "README.md"):
        if (src / name).is_file():
            files.append((src / name, dst / name))
    # A smaller subset after a larger one: drop what the subset does not hold.
    wanted = {d for _, d in files}
    if dst.exists():
        for old in dst.rglob("*"):
            if old.is_file() and old not in wanted:
                old.unlink()
    copied = 0
    for s, d in files:
        if not (d.is_file() and d.stat().st_size == s.stat().st_size):
            _atomic_copy(s, d)
            copied += 1
    return {"images": len(images), "files": len(files), "copied": copied,
            "bytes": sum(d.stat().st_size for _, d in files)}


def _run(cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def download_wheels(dst: Path, python: str) -> list:
    """``pip download`` the cp312 manylinux wheels of :data:`WHEELS` into ``dst`` (kept when present)."""
    dst.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "-d", dst]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    _run(cmd + list(WHEELS))
    return sorted(p.name for p in dst.glob("*.whl") if not p.name.startswith("cobalance-"))


def build_python312(python312: str, venv: Path) -> Path:
    """A venv of ``python312`` holding the build requirements (created once)."""
    exe = venv / "bin" / "python"
    if not exe.exists():
        _run([python312, "-m", "venv", venv])
    _run([exe, "-m", "pip", "install", "-q", "--disable-pip-version-check", *BUILD_REQUIREMENTS])
    return exe


def build_cobalance_wheel(dst: Path, python312: Path) -> dict:
    """Build cobalance's cp312 wheel from this checkout into ``dst``; return its name and seconds.

    Older cobalance wheels in ``dst`` are removed (two versions would stop the install).
    """
    dst.mkdir(parents=True, exist_ok=True)
    version = subprocess.run([str(python312), "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    if version != "True":
        raise ValueError(f"--python312 {str(python312)!r} is not a Python 3.12 (the GPU machine's)")
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        t0 = time.perf_counter()
        _run([python312, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-build-isolation",
              "--no-deps", "-C", "build-dir=build/gpu-cp312", "-w", tmp, REPO], cwd=REPO)
        seconds = time.perf_counter() - t0
        built = list(Path(tmp).glob("cobalance-*.whl"))
        if len(built) != 1:
            raise ValueError(f"expected one cobalance wheel from the build, got {[p.name for p in built]}")
        for old in dst.glob("cobalance-*.whl"):
            old.unlink()
        os.replace(built[0], dst / built[0].name)
    return {"wheel": built[0].name, "build_seconds": round(seconds, 1)}


def native_sources_hash(root: Path = REPO) -> str:
    """SHA-256 over the files the compiled extension is built from (``cpp/``, the CMake
    files, ``pyproject.toml``): the run script rebuilds cobalance when the carried
    wheel was built from other ones."""
    paths = sorted(p for p in (root / "cpp").rglob("*") if p.is_file())
    paths += sorted(p for p in (root / "cmake").rglob("*") if p.is_file())
    paths += [root / name for name in ("CMakeLists.txt", "pyproject.toml") if (root / name).is_file()]
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def travelling_bytes(carry: Path) -> dict:
    """Bytes that travel to the GPU machine: tracked and untracked-not-ignored files, and ``carry``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.split(b"\0")
    tree = 0
    for name in listed:
        path = REPO / os.fsdecode(name)
        if name and path.is_file() and not path.is_symlink():
            tree += path.stat().st_size
    carried = sum(p.stat().st_size for p in carry.rglob("*") if p.is_file()) if carry.exists() else 0
    return {"tree": tree, "carry": carried, "total": tree + carried, "limit": TRAVEL_LIMIT}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "idrid"),
                   help="IDRiD half-resolution folder (default ../shared/data/idrid beside the checkout)")
    p.add_argument("--carry", default=str(REPO / ".gpu-carry"), help="folder to write (default .gpu-carry)")
    p.add_argument("--max-images", type=int, default=None, help="copy only the first N images (tests)")
    p.add_argument("--no-wheels", dest="wheels", action="store_false",
                   help="neither download wheels nor build cobalance's (tests, or no network)")
    p.add_argument("--python312", default=os.environ.get("PYTHON312", "/root/.pyenv/versions/3.12.1/bin/python"),
                   help="a Python 3.12 to build cobalance's cp312 wheel with (default $PYTHON312 or pyenv's 3.12.1)")
    p.add_argument("--build-venv", default=str(Path(tempfile.gettempdir()) / "cobalance-gpu-build312"),
                   help="venv of --python312 with the build requirements (created once)")
    p.add_argument("--native-hash", action="store_true",
                   help="print the hash of the extension's sources and exit (the run script compares it)")
    args = p.parse_args(argv)
    if args.native_hash:
        print(native_sources_hash())
        return 0

    carry = Path(args.carry).resolve()
    manifest = {"commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                         text=True).stdout.strip(),
                "data_source": str(Path(args.data).resolve())}
    manifest["data"] = copy_data(Path(args.data), carry / "idrid", args.max_images)
    print(f"data: {manifest['data']['images']} images, {manifest['data']['bytes'] / 2**20:.1f} MiB", flush=True)
    if args.wheels:
        manifest["wheels"] = download_wheels(carry / "whl", sys.executable)
        native = native_sources_hash()
        manifest["cobalance"] = build_cobalance_wheel(carry / "whl", build_python312(args.python312,
                                                                                    Path(args.build_venv)))
        manifest["cobalance"]["native_sources_sha256"] = native
        print(f"cobalance wheel built in {manifest['cobalance']['build_seconds']} s", flush=True)
    size = manifest["size"] = travelling_bytes(carry)
    tmp = carry / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, carry / "manifest.json")
    print(f"travels: tree {size['tree'] / 2**20:.1f} MiB + carry {size['carry'] / 2**20:.1f} MiB = "
          f"{size['total'] / 2**20:.1f} MiB of {size['limit'] / 2**20:.0f} MiB", flush=True)
    if size["total"] > TRAVEL_LIMIT:
        print("error: over the 64 MiB that may travel; carry less", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
