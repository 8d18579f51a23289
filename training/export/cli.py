"""The command line: `python -m training.export ...` -> ExportOptions -> export(), and the exit status."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from training.export.converter import default_converter_dir, fetch_converter
from training.export.errors import CheckFailed, ExportError
from training.export.pipeline import export
from training.export.quants import QUANTS

log = logging.getLogger("training.export")


@dataclass(frozen=True)
class ExportOptions:
    """What to export and where (the library API of export(); the command line's flags, typed)."""

    run: str | None = None  # run name under output_dir; None: the newest run with an adapter
    format: str = "gguf"  # gguf: merged model + GGUF + Modelfile; merged: merged safetensors only
    quant: str = "q8_0"  # a key of QUANTS (any case)
    base: str | None = None  # base model id or folder; None: the one the run was trained on
    allow_other_base: bool = False
    dtype: str = "auto"  # merge precision: auto | bf16 | f32 | f16
    force_merge: bool = False
    compare_trained: bool = True  # the informational comparison with the 4-bit model as trained
    output_dir: Path = Path("outputs")
    gguf_dir: Path = Path("models/gguf")
    converter_dir: Path | None = None  # None: default_converter_dir()
    converter_sdist: Path | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ExportOptions":
        def path(value: str | None) -> Path | None:
            return Path(value) if value else None

        return cls(run=args.run, format=args.format, quant=args.quant, base=args.base,
                   allow_other_base=args.allow_other_base, dtype=args.dtype, force_merge=args.force_merge,
                   compare_trained=not args.no_trained_comparison, output_dir=Path(args.output_dir),
                   gguf_dir=Path(args.gguf_dir), converter_dir=path(args.converter_dir),
                   converter_sdist=path(args.converter_sdist))


def make_parser() -> argparse.ArgumentParser:
    import training.export

    p = argparse.ArgumentParser(prog="python -m training.export", description=training.export.__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="run name under --output-dir (default: the newest run with an adapter)")
    p.add_argument("--format", choices=("gguf", "merged"), default="gguf",
                   help="gguf: merged model + GGUF + Modelfile; merged: merged safetensors only (default: %(default)s)")
    p.add_argument("--quant", default="q8_0", metavar="|".join(QUANTS),
                   help="GGUF type; q8_0 is near-lossless at half of bf16's size (default: %(default)s)")
    p.add_argument("--base", help="base model id or folder (default: the one the run was trained on)")
    p.add_argument("--allow-other-base", action="store_true",
                   help="accept a --base other than the adapter's recorded one (e.g. a local copy of the same weights)")
    p.add_argument("--dtype", choices=("auto", "bf16", "f32", "f16"), default="auto",
                   help="merge precision; auto: the base checkpoint's own (bf16 for Gemma) (default: %(default)s)")
    p.add_argument("--force-merge", action="store_true", help="merge again even if outputs/<run>/merged/ is current")
    p.add_argument("--no-trained-comparison", action="store_true",
                   help="skip the informational comparison with the 4-bit model as trained (slow for big models)")
    p.add_argument("--output-dir", default=os.environ.get("OUTPUT_DIR", "outputs"), help="default: %(default)s")
    p.add_argument("--gguf-dir", default=os.environ.get("GGUF_DIR", "models/gguf"), help="default: %(default)s")
    p.add_argument("--converter-dir", help="unpacked llama.cpp converter (default: $LLAMA_CPP_CONVERTER_DIR or "
                                           "models/converters/llama-cpp-python-VERSION)")
    p.add_argument("--converter-sdist", help="a llama_cpp_python-VERSION.tar.gz to unpack the converter from")
    p.add_argument("--fetch-converter", action="store_true", help="only make the converter ready, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    opts = ExportOptions.from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S")
    try:
        if args.fetch_converter:
            folder = opts.converter_dir or default_converter_dir()
            fetch_converter(folder, opts.converter_sdist)
            print(f"converter ready in {folder}")
            return 0
        report = export(opts)
    except ExportError as exc:
        log.error("%s", exc)
        return 2
    except CheckFailed as exc:
        log.error("export check failed: %s", exc)
        return 3
    except Exception as exc:
        from training.disk import export_disk_full_message, is_disk_full

        if not is_disk_full(exc, opts.gguf_dir):
            raise
        log.error("%s", export_disk_full_message(exc, opts.output_dir, opts.gguf_dir))
        return 2
    print(summary_line(report))
    return 0


def summary_line(report: dict) -> str:
    """What the export made, in one line for the terminal."""
    if report.get("gguf_dir"):
        c = report["checks"]["logits_vs_merged"]
        return (f"exported {report['gguf_dir']}/{report['gguf_file']} ({report['gguf_bytes'] / 2**20:.1f} MiB): "
                f"top-1 agreement {c['top1_agreement']:.3f}, max logit diff {c['max_logit_diff_sd']:.3g} sd; "
                f"ollama create {report['run']} -f {report['gguf_dir']}/Modelfile")
    return f"merged model in {report['merged_dir']} ({report['merged_bytes'] / 2**20:.1f} MiB)"
