"""llama.cpp's convert_hf_to_gguf.py: found, or unpacked once from the pinned llama-cpp-python source package (the
wheel does not carry it), and the installed llama-cpp-python that quantises and checks what it writes."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from training.export.errors import ExportError
from training.jsonio import write_json_atomic

log = logging.getLogger(__name__)

# The converter and gguf-py must come from the same llama.cpp as the runtime that quantises and checks the file.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# sha256 of the source packages the converter is unpacked from (as published on PyPI): a different file is refused
SDIST_SHA256 = {"0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"}
CONVERTER_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
CONVERTER_INFO = "converter_info.json"  # in the converter folder, written last: the unpacked converter is complete


def default_converter_dir() -> Path:
    return Path(os.environ.get("LLAMA_CPP_CONVERTER_DIR",
                               f"models/converters/llama-cpp-python-{llama_cpp_version() or LLAMA_CPP_PYTHON_VERSION}"))


def llama_cpp_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def require_llama_cpp() -> str:
    ver = llama_cpp_version()
    if ver is None:
        raise ExportError(
            "GGUF export needs llama-cpp-python (to quantise and to check the file), and it is not installed.\n-> "
            f"CMAKE_ARGS=-DGGML_NATIVE=OFF pip install 'llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}' requests "
            "(or pip install -e '.[export]'; it compiles for ~5 minutes), or use --format merged")
    return ver


def converter_ready(folder: Path) -> bool:
    return (folder / CONVERTER_INFO).is_file() and (folder / "convert_hf_to_gguf.py").is_file()


def sha256(path: Path) -> str:
    from training.checkpoints import sha256_file

    return sha256_file(path)[1]


def fetch_converter(folder: Path, sdist: Path | None = None) -> Path:
    """Unpack convert_hf_to_gguf.py, its conversion/ package and gguf-py/ from the llama-cpp-python source package
    of the installed version (the wheel does not carry them; PyPI's `gguf` is too old for this converter)."""
    if converter_ready(folder):
        return folder
    ver = llama_cpp_version() or LLAMA_CPP_PYTHON_VERSION
    if sdist is not None and not (sdist.is_file() and tarfile.is_tarfile(sdist)):
        raise ExportError(f"--converter-sdist {sdist}: not a readable .tar.gz.\n-> pip download --no-binary "
                          f"llama-cpp-python --no-deps llama-cpp-python=={ver} -d DIR, then pass "
                          f"DIR/llama_cpp_python-{ver}.tar.gz")
    with tempfile.TemporaryDirectory(prefix="llama-sdist-") as td:
        if sdist is None:
            sdist = _download_sdist(ver, Path(td))
        digest = sha256(sdist)
        if ver in SDIST_SHA256 and digest != SDIST_SHA256[ver]:
            raise ExportError(f"{sdist}: sha256 {digest} is not the published llama-cpp-python {ver} source package "
                              f"({SDIST_SHA256[ver]}).\n-> download it again from PyPI (pip download --no-binary "
                              f"llama-cpp-python --no-deps llama-cpp-python=={ver})")
        tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        prefix = _unpack_converter(sdist, tmp)
        write_json_atomic(tmp / CONVERTER_INFO, {"llama_cpp_python": ver, "source": prefix, "sdist_sha256": digest})
        if folder.exists():
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, folder)
    log.info("converter ready in %s", folder)
    return folder


def _download_sdist(ver: str, into: Path) -> Path:
    log.info("fetching llama-cpp-python %s source (~75 MB, once) for llama.cpp's converter", ver)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", "llama-cpp-python",
                           "--no-deps", "--quiet", f"llama-cpp-python=={ver}", "-d", str(into)],
                          capture_output=True, text=True)
    found = list(into.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not found:
        raise ExportError(
            f"cannot download the llama-cpp-python {ver} source package for the GGUF converter: "
            f"{(proc.stderr.strip().splitlines() or ['pip failed'])[-1]}\n-> run `python -m training.export "
            "--fetch-converter` once with network access, or pass --converter-sdist PATH to a "
            f"llama_cpp_python-{ver}.tar.gz, or set LLAMA_CPP_CONVERTER_DIR to an unpacked converter")
    return found[0]


def _unpack_converter(sdist: Path, tmp: Path) -> str | None:
    """The converter's files from vendor/llama.cpp/ of the source package into `tmp`; returns the package's top
    folder. Removes `tmp` and refuses a package without the converter."""
    prefix = None
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/vendor/llama.cpp/", 1)
            if len(parts) != 2 or not member.isfile():
                continue
            rel = parts[1]
            if any(rel == m or (m.endswith("/") and rel.startswith(m)) for m in CONVERTER_MEMBERS):
                prefix = parts[0]
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    if not (tmp / "convert_hf_to_gguf.py").is_file() or not (tmp / "gguf-py" / "gguf").is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"{sdist} does not contain vendor/llama.cpp/convert_hf_to_gguf.py and gguf-py/.\n-> use "
                          f"the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} source package (.tar.gz)")
    return prefix
