"""``caloman export RUN --format onnx --out model.onnx``: a trained run as one ONNX
graph with explicit noise inputs, plus its ``model.json`` sidecar."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """\
examples:
  caloman export results/run --format onnx --out model.onnx
  caloman export results/run --format onnx --convention par04 --out par04.onnx
Needs the optional extra: pip install 'caloman[export]'. See docs/deployment.md."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export", help="export a trained run as an ONNX graph for simulation frameworks",
        description="Write one ONNX graph that maps explicit noise and the incident energy to voxel energies "
                    "(every flow, the decoder, the inverse preprocessing, the voxel noise, the readout threshold "
                    "and the renormalisation inside), check it against the PyTorch sampler with ONNX Runtime, and "
                    "write a JSON sidecar (binning, trained energy range, inputs and outputs) beside it.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="run directory written by caloman train")
    parser.add_argument("--format", choices=("onnx",), default="onnx", help="export format (only onnx)")
    parser.add_argument("--out", required=True, type=Path, metavar="MODEL.onnx",
                        help="output graph; the sidecar goes beside it as MODEL.json")
    parser.add_argument("--convention", choices=("caloman", "par04"), default="caloman",
                        help="inputs and outputs: caloman (noise and E_inc in, voxels in MeV out, default) or par04 "
                             "(one vector [noise, condition] in, voxels / E_inc in (r, phi, z) order out)")
    parser.add_argument("--condition-size", type=int, default=4, metavar="C",
                        help="par04: length of the condition vector; the first entry is E_inc / the trained maximum, "
                             "the other C-1 (Par04: angle, geometry one-hot) are ignored (default 4)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from caloman.export import export_onnx

    result = export_onnx(args.run_dir, args.out, convention=args.convention, condition_size=args.condition_size)
    check = result.check
    print(f"export: {result.onnx_path} and {result.sidecar_path} ({args.convention} convention); ONNX Runtime "
          f"matches PyTorch on {check.showers} showers within {check.max_relative_error:.1e} relative")
    return 0
