"""Fetch the pinned llama.cpp source and apply kvgguf's patches to it.

Called by CMakeLists.txt at configure time:

    python cmake/prepare_llama.py --cache DIR --dest DIR --patches DIR [--build-info FILE]

1. The llama-cpp-python sdist (which vendors llama.cpp at the commit its ctypes bindings were written for) is
   downloaded with pip into the cache directory, unless a copy with the right sha256 is already there, so rebuilds
   work offline.
2. Its ``vendor/llama.cpp`` tree is extracted into ``--dest``.
3. ``patches/*.patch`` are applied in name order with ``git apply``; a patch that does not apply fails the build
   with its name. ``--no-patches`` applies only the patches whose header has a ``Baseline: applied`` line (fixes
   of upstream crashes, without which the pinned llama.cpp does not run on some hosts): the unpatched baseline
   build, scripts/build_baseline.sh.

``--build-info`` writes which llama.cpp and which patch set the build uses (JSON; installed beside the libraries,
so that a compressed-context file can say which library wrote its llama.cpp state).

The tree is prepared again whenever the sdist or any patch changes (a stamp file records their digests); only
files whose content changed are rewritten, so an incremental build recompiles just what a patch touches.
"""
from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
ARCHIVE = f"llama_cpp_python-{VERSION}.tar.gz"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDOR_PREFIX = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_sdist(cache: Path) -> Path:
    archive = cache / ARCHIVE
    if archive.exists() and sha256_of(archive) == SHA256:
        return archive
    cache.mkdir(parents=True, exist_ok=True)
    print(f"-- kvgguf: downloading {PACKAGE}=={VERSION} sdist into {cache}", flush=True)
    # --no-build-isolation: preparing the sdist's metadata needs only scikit-build-core, which this build has;
    # with isolation pip would install (and with --no-binary :all: even compile) the sdist's build requirements.
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE, "--no-build-isolation",
         "--dest", str(cache), f"{PACKAGE}=={VERSION}"],
        check=True,
    )
    actual = sha256_of(archive)
    if actual != SHA256:
        archive.unlink()
        raise SystemExit(f"kvgguf: {ARCHIVE} has sha256 {actual}, expected {SHA256}")
    return archive


def extract_vendor(archive: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.name.startswith(VENDOR_PREFIX):
                continue
            relative = member.name[len(VENDOR_PREFIX):]
            # the sdist keeps llama.cpp's submodule pointer (.git file); it would make git think dest is a repo
            if not relative or relative == ".git":
                continue
            member.name = relative
            tar.extract(member, dest, filter="data")


def applies_to_baseline(patch: Path) -> bool:
    """Whether the patch's header (the text before its first ``---`` line) marks it ``Baseline: applied``."""
    header = patch.read_text().split("\n---\n", 1)[0]
    return any(line.startswith("Baseline: applied") for line in header.splitlines())


def apply_patches(patches: list[Path], dest: Path) -> None:
    env = dict(os.environ)
    # keep git from discovering an enclosing repository (e.g. kvgguf's own checkout around the build dir):
    # inside a work tree, git apply resolves paths against that tree's root and silently skips the rest
    env["GIT_CEILING_DIRECTORIES"] = str(dest.parent)
    for patch in patches:
        result = subprocess.run(
            ["git", "apply", "--whitespace=nowarn", "-p1", str(patch)],
            cwd=dest, env=env, capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise SystemExit(f"kvgguf: patch {patch.name} does not apply to llama.cpp {VERSION}:\n{result.stderr}")
        print(f"-- kvgguf: applied {patch.name}", flush=True)


def sync_tree(src: Path, dest: Path) -> None:
    """Make dest equal to src, touching only files that differ (their mtimes drive the incremental build)."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = set()
    for path in src.rglob("*"):
        relative = path.relative_to(src)
        wanted.add(relative)
        target = dest / relative
        if path.is_dir():
            target.mkdir(exist_ok=True)
        elif not target.is_file() or not filecmp.cmp(path, target, shallow=False):
            shutil.copy2(path, target)
    for path in sorted(dest.rglob("*"), reverse=True):
        if path.relative_to(dest) not in wanted and path.name != ".kvgguf-stamp":
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True, help="where the sdist is kept between builds")
    parser.add_argument("--dest", type=Path, required=True, help="where the patched llama.cpp tree goes")
    parser.add_argument("--patches", type=Path, required=True, help="directory of NNNN-*.patch files")
    parser.add_argument("--no-patches", action="store_true",
                        help="apply only the 'Baseline: applied' crash fixes (the unpatched baseline of `kvgguf "
                             "bench speed`)")
    parser.add_argument("--build-info", type=Path, help="write the llama.cpp version and patch set here (JSON)")
    args = parser.parse_args()

    archive = fetch_sdist(args.cache)
    patches = sorted(args.patches.glob("*.patch"))
    if args.no_patches:
        patches = [patch for patch in patches if applies_to_baseline(patch)]
    stamp_text = "\n".join([SHA256] + [f"{p.name} {sha256_of(p)}" for p in patches]) + "\n"
    if args.build_info is not None:
        info = {"llama_cpp_python": VERSION, "sdist_sha256": SHA256, "patches": [p.name for p in patches],
                "patch_set": hashlib.sha256(stamp_text.encode()).hexdigest()}
        args.build_info.parent.mkdir(parents=True, exist_ok=True)
        args.build_info.write_text(json.dumps(info, indent=1) + "\n")
    stamp = args.dest / ".kvgguf-stamp"
    if stamp.exists() and stamp.read_text() == stamp_text:
        return
    args.dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dest.parent) as scratch:
        fresh = Path(scratch) / "llama.cpp"
        extract_vendor(archive, fresh)
        apply_patches(patches, fresh)
        sync_tree(fresh, args.dest)
    stamp.write_text(stamp_text)


if __name__ == "__main__":
    main()
