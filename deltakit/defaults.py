"""Defaults and choices the CLI shows in its help, kept free of heavy imports so that ``--help`` loads no torch.

The library reads them from here too (``math.ranks``, ``ops.inspect``, ``io.dtypes``): one definition each.
"""

DEFAULT_RANK = 16
DEFAULT_MAX_RANK = 256
DEFAULT_INSPECT_RANKS = (8, 16, 32, 64, 128, 256)  # inspect's energy-at-rank columns

# What --dtype accepts: the float dtypes deltakit stores factors and merged weights in, by name, mapped to the
# torch attribute (io.dtypes.DTYPES holds the torch dtypes).
STORED_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
                 "bfloat16": "bfloat16", "bf16": "bfloat16"}

# --calib: how many calibration tokens, in sequences of this length (extract and inspect).
CALIB_TOKENS = 32768
CALIB_SEQ_LEN = 256

# --budget-weighting: how a budget is spent (math.ranks.BudgetRanks). The default is uniform because on
# benchmarks/bench_quality.py both spectrum weightings gave a higher output KL than uniform rank at equal bytes on
# the Llama pair (issue 14: a default must never be worse than uniform rank on any pair there).
WEIGHTINGS = ("uniform", "absolute", "relative")
DEFAULT_WEIGHTING = "uniform"

# --factor-dtype: how extract stores the factors (math.quantize.FACTOR_CODECS); scripts depend on these names.
FACTOR_DTYPES = ("int8", "float8_e4m3fn", "bfloat16", "float16", "float32")
