"""Run one benchmark module with its result records sent to a given folder.

    python -m experiments.run_config --results-dir DIR MODULE [ARGS ...]

runs ``python -m MODULE ARGS ...`` in this process, unchanged, except that every
``experiments.harness.save_result`` call without an explicit folder writes into DIR
(``harness.redirect_results``).  ``experiments.reproduce`` starts each configuration
this way, in a fresh process, so benchmarks need no output-folder option of their own.
The exit status is the benchmark's.
"""
from __future__ import annotations

import argparse
import runpy
import sys

from experiments import harness


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", required=True, help="folder for the benchmark's JSON records")
    p.add_argument("module", help="benchmark module, e.g. experiments.llama_decode")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own arguments")
    ns = p.parse_args(argv)
    # the benchmark parses sys.argv itself; runpy puts the module's file in sys.argv[0]
    sys.argv = [ns.module, *ns.args]
    with harness.redirect_results(ns.results_dir):
        runpy.run_module(ns.module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
