"""The gfl_ops benchmark: providers side by side, speed, peak memory and bandwidth, in one run.

    python -m gfl_ops bench                 # the default set for the device (see below)
    python -m gfl_ops bench --quick         # headline shapes only, under a minute on 2 CPU cores
    python -m gfl_ops bench --half          # native in fp32, fp16 and bf16 (the half-precision target)
    python -m gfl_ops bench --json out.json --plot out.png
    python -m gfl_ops bench --from-json benchmarks/results/cpu-amd-epyc-2core.json

The package, all of it installed with gfl_ops (pip install . or -e .):

    cli.py          the options, the plan they make, main()
    cases.py        Case (an op at a shape, layout, dtype), Inputs, OpSpec (an op for the harness)
    ops/            one module per op family: its shapes, inputs, byte model and peers
                    (qfl.py: qfl, qfl_prob, qfl_dense, qfl_dense_beta0, qfl_dense_beta1.5;
                    family.py: focal, varifocal; dfl.py; integral.py); the registry
    providers.py    native, triton, reference, compile and the eager peers: which can run,
                    and why not
    peers.py        the peers: mmdetection's, torchvision's and ultralytics' own code,
                    imported where those frameworks are installed
    measure.py      timing, peak memory, the copy that is the bandwidth yardstick
    runner.py       the run: warm-up, interleaved rounds, rows; fp32 ratios
    targets.py      the issues' targets and their verdicts
    report.py       table and plot
    results.py      environment, the JSON document, reading saved results back

Ops: qfl (logits, label/score targets), qfl_prob (probabilities), qfl_dense (dense soft
target; at beta 0 and 1.5 too), focal (labels), varifocal (dense IoU target), dfl,
integral. Modes: "forward" (the loss as a training step computes it: pred requires grad, so
a fused kernel may produce the gradient in this pass) and "full"
(forward + backward, the headline).

Default set on CUDA: QFL N in {8400, 44800, 134400, 358400, 537600} x 80 and 8400 x 1203,
(N, C) and channel-first (2, C, H, W); DFL / integral rows in {4096, 16384, 65536, 262144}
x {16, 17} bins; float32 and bfloat16. On CPU the default drops the largest QFL sizes
(358400, 537600) and DFL size (262144), the channel-first layout of qfl_prob, and bfloat16,
so that it finishes in a few minutes on a small machine: --full restores the shapes, --dtype
fp32 bf16 the dtype.
"""

from .cases import BETA, CHANNEL_FIRST_BATCH, DTYPES, LAYOUTS, MODES, Case, Inputs, OpSpec, dtype_name
from .cli import main, parse_args, plan
from .measure import Timer, make_copy, peak_extra_bytes
from .ops import OP_SPECS, OPS, build_cases, bytes_moved, make_inputs
from .providers import (
    PROVIDERS,
    available_providers,
    clear_grad,
    make_provider,
    not_run,
    provider_status,
    run_step,
    select_providers,
)
from .report import format_table, write_plot
from .results import default_results_path, environment, load_results, results_document
from .runner import Settings, add_fp32_ratios, benchmark_case, run
from .targets import COPY_FRACTION, FP32_RATIO, HEADLINE_TARGETS, PEAK_OVER_PRED, PEAK_VS_REFERENCE, format_headlines
