"""Decode benchmark (`python -m mixops.bench decode`, and the last table of the default moe job):
the MoE layer at 1, 4 and 16 tokens per step, where a step's time is the time to read the chosen
experts' weights from memory. mixops.nn.MoE beside HF transformers' MixtralSparseMoeBlock with its
"eager" and "grouped_mm" experts (the same weights per layer), eval mode, under torch.no_grad().

Against the cache: each implementation holds --decode-layers distinct layers (8 x 8 experts x
12 MiB in bf16: 768 MiB, far above a 32 MiB L3) and every timed call runs the next layer on the
next input of a pool of 64 (so the experts chosen vary); the implementations are timed round-robin
(timing.interleaved_median_ms), so drift in the machine hits all alike. The yardstick is the
machine's read bandwidth, measured in the same round-robin: a sum over a 512 MiB fp32 tensor is
one more entry of every run (on this shared 2-core VM the bandwidth swung between 19 and 36 GB/s
from one run to the next). CPU only: on CUDA the table is skipped with a line saying so.
"""

import argparse
import gc
import math
import statistics
import sys

import torch

from .grouped_mm import native_lowp_matmul
from .moe_cases import IMPLS, Config, build, init_weights, peer
from .timing import interleaved_median_ms, selected_dtypes

# Mixtral's routing (E 8, top-2) at the width of the moe bench's coarse-8x2 (one expert: 12 MiB
# in bf16); the tokens are set per step. All three impls' layers are built at once and timed
# round-robin: 3 x 768 MiB in bf16, 3 x 1.5 GiB in fp32.
DECODE = Config("mixtral-decode", 0, 1024, 2048, 8, 2)
QUICK = Config("mixtral-decode", 0, 128, 128, 8, 2)
TOKENS = (1, 4, 16)
POOL = 64  # distinct inputs per tokens-per-step
TARGET = 0.60  # issue 29: mixops bf16 at 1 token >= 60% of the read bandwidth
READ_MIB = 512
READ = "read probe"


def read_probe(device, mib=READ_MIB):
    """(step, bytes): ``buf.sum()`` over a ``mib`` MiB float32 tensor with torch's threads, whose
    median time gives the read bandwidth."""
    buf = torch.ones(mib << 18, dtype=torch.float32, device=device)
    return buf.sum, buf.numel() * buf.element_size()


def build_layers(cfg, n, device, dtype):
    """{impl: [n layers]}: layer j of every impl holds the weights of init_weights(seed=j)
    (mixops' drawn, then loaded into both HF blocks), all in eval mode."""
    layers = {impl: [] for impl in IMPLS}
    for j in range(n):
        ref = init_weights(build(cfg, "mixops", device, dtype), seed=j).eval()
        layers["mixops"].append(ref)
        for impl in IMPLS[1:]:
            m = build(cfg, impl, device, dtype)
            m.load_state_dict(ref.state_dict())
            layers[impl].append(m.eval())
    return layers


def expert_bytes(layer):
    """Bytes of one expert's weights: its gate_up [2*ffn, hidden] and down [hidden, ffn] rows."""
    e = layer.experts
    return sum(w[0].numel() * w.element_size() for w in (e.gate_up_proj, e.down_proj))


def cycle(n_layers, n_inputs):
    """The (layer, input) pairs in the order every impl's calls visit them: call c runs layer
    c % n_layers on input c % n_inputs; the order repeats after lcm(n_layers, n_inputs) calls."""
    return [(c % n_layers, c % n_inputs) for c in range(math.lcm(n_layers, n_inputs))]


def distinct_experts(mixops_layers, xs, pairs):
    """The mean over ``pairs`` of the number of distinct experts the step's tokens chose, by
    mixops.nn.MoE's own router (dispatch_start(x).r.ids, in the layer's dtype); the HF blocks hold
    the same weights, so they choose the same experts up to low-precision ties."""
    counts = [torch.unique(mixops_layers[j].dispatch_start(xs[i]).r.ids).numel() for j, i in pairs]
    return statistics.fmean(counts)


def sweep(layers, xs, pairs):
    """A step that makes len(layers) calls, each the next (layer, input) pair of ``pairs``: one
    call on every layer per step, continuing where the last step stopped."""
    state = {"c": 0}

    def step():
        c = state["c"]
        for k in range(len(layers)):
            j, i = pairs[(c + k) % len(pairs)]
            layers[j](xs[i])
        state["c"] = (c + len(layers)) % len(pairs)

    return step


def time_dtype(cfg, dtype, n_layers, device, reps, probe):
    """The rows of one dtype: {(tokens, impl): (ms per call, experts, bytes, GB/s, read GB/s of
    the same run, % of it)}. Before each tokens-per-step is timed, every impl runs the whole cycle
    of (layer, input) pairs once, so that each expert's weights have been read before."""
    layers = build_layers(cfg, n_layers, device, dtype)
    one = expert_bytes(layers["mixops"][0])
    g = torch.Generator(device=device).manual_seed(3)
    rows = {}
    for t in TOKENS:
        xs = [
            torch.randn(1, t, cfg.hidden, generator=g, device=device, dtype=dtype)
            for _ in range(POOL)
        ]
        pairs = cycle(n_layers, POOL)
        experts = distinct_experts(layers["mixops"], xs, pairs)
        fns = {impl: sweep(layers[impl], xs, pairs) for impl in IMPLS}
        fns = {impl: fn if impl == "mixops" else peer(fn) for impl, fn in fns.items()}
        for fn in fns.values():
            for _ in range(len(pairs) // n_layers):
                try:
                    fn()
                except RuntimeError:
                    break  # (interleaved_median_ms reports it)
        fns[READ] = probe[0]
        ms = interleaved_median_ms(fns, device, reps)
        read = probe[1] / (ms[READ] * 1e-3) / 1e9
        for impl in IMPLS:
            per_call = ms[impl] / n_layers
            nbytes = experts * one
            gbs = nbytes / (per_call * 1e-3) / 1e9
            rows[t, impl] = (per_call, experts, nbytes, gbs, read, 100.0 * gbs / read)
        print(
            f"decode {str(dtype)[6:]} {t} tokens: mixops {rows[t, 'mixops'][0]:.3f} ms/call, "
            f"{rows[t, 'mixops'][5]:.1f}% of the read bandwidth ({read:.1f} GB/s)",
            file=sys.stderr,
            flush=True,
        )
    del layers
    gc.collect()
    return rows, one


def run(args):
    device = args.device
    if device.startswith("cuda"):
        print(
            "decode table: skipped on cuda (it measures CPU decoding against the DRAM read "
            "bandwidth; run `python -m mixops.bench decode --device cpu`)"
        )
        return {}
    cfg = QUICK if args.quick else DECODE
    n_layers = args.decode_layers
    dtypes = selected_dtypes(args)
    print(
        f"mixops MoE decode benchmark on {device}: {torch.get_num_threads()} threads, CPU "
        f"capability {torch.backends.cpu.get_cpu_capability()}, avx512_bf16/amx_bf16 (native bf16 "
        f"GEMM): {native_lowp_matmul(torch.bfloat16, device)}, torch {torch.__version__}"
    )
    print(
        f"layer: hidden {cfg.hidden}, ffn {cfg.ffn}, E {cfg.experts}, top-{cfg.topk}; eval, "
        f"torch.no_grad(); {n_layers} distinct layers per impl (same weights across impls), called "
        f"in turn, each call on the next of {POOL} random inputs [1, tokens, hidden]"
    )
    print(
        f"ms/call = median over {args.reps} reps of one call on each of the {n_layers} layers, / "
        f"{n_layers}; experts = mean distinct experts the step's tokens chose (mixops.nn.MoE's "
        f"router, dispatch_start(x).r.ids, over the {math.lcm(n_layers, POOL)} (layer, input) "
        "pairs the calls cycle through); MiB read = experts x one expert's gate_up + down; GB/s = "
        "MiB read / ms per call"
    )
    print(
        f"read GB/s = the machine's read bandwidth: {READ_MIB} MiB / median time of torch.sum over "
        f"a {READ_MIB} MiB float32 tensor ({torch.get_num_threads()} threads), timed in the same "
        "round-robin as that row's layers; % read = GB/s / read GB/s"
    )
    if args.quick:
        print("(--quick: small layers that fit in the cache; the GB/s are not meaningful)")
    results = {}
    probe = read_probe(device)
    with torch.no_grad():
        for dtype in dtypes:
            rows, one = time_dtype(cfg, dtype, n_layers, device, args.reps, probe)
            results[str(dtype)[6:]] = rows
            print(f"{str(dtype)[6:]}: one expert = {one / 2**20:.2f} MiB")
    del probe
    head = (
        f"{'dtype':<9} {'tokens':>6} {'impl':<14} {'ms/call':>9} {'experts':>8} "
        f"{'MiB read':>9} {'GB/s':>7} {'read GB/s':>10} {'% read':>7}"
    )
    print()
    print(head)
    print("-" * len(head))
    for dt, rows in results.items():
        for t in TOKENS:
            for impl in IMPLS:
                ms, experts, nbytes, gbs, read, pct = rows[t, impl]
                print(
                    f"{dt:<9} {t:>6} {impl:<14} {ms:>9.3f} {experts:>8.2f} "
                    f"{nbytes / 2**20:>9.1f} {gbs:>7.1f} {read:>10.1f} {pct:>6.1f}%"
                )
        print()
    if "bfloat16" in results:
        pct = results["bfloat16"][1, "mixops"][5]
        met = "met" if pct >= 100 * TARGET else "NOT met"
        print(
            f"target (issue 29): mixops bfloat16 at 1 token >= {100 * TARGET:.0f}% of the read "
            f"bandwidth: {pct:.1f}% -> {met}" + (" (--quick shapes)" if args.quick else "")
        )
    else:
        print("target (issue 29): not checked (bfloat16 not timed)")
    return results


def add_args(p: argparse.ArgumentParser):
    """decode's own options (--device, --quick, --reps, --dtype are shared)."""
    p.add_argument(
        "--decode-layers",
        type=int,
        default=8,
        help="distinct layers per implementation, called in turn so that their weights "
        "(8 x 96 MiB in bf16) do not stay in the cache (also the moe job's decode table)",
    )
